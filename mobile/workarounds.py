"""Where edgeseg reaches into ExecuTorch internals, in one place.

Each works around behaviour of ExecuTorch 1.5's XNNPACK backend that its public API does not
expose. `tests/test_mobile.py::test_executorch_workarounds_still_apply` checks the internals
they rely on, so an ExecuTorch upgrade that moves them fails loudly there instead of silently
giving larger or unloadable programs.
"""
from __future__ import annotations

import contextlib

__all__ = ["compact_constant_keys", "int8_partitioner", "transient_conv_indirection", "workarounds_apply"]

CONV_TARGET = "aten.convolution.default"  # the key of XNNPACK's conv visitor in its registry


@contextlib.contextmanager
def compact_constant_keys():
    """Name XNNPACK's constants 0, 1, 2, ... instead of by their 64-character sha256.

    XNNPACK's serializer keys every constant (weights, biases, per-channel scales) by the hex
    sha256 of its bytes, and the key is written twice: in the delegate's graph and in the
    program's named-data table, a noticeable share of a small int8 program (bench/README.md,
    "Design measurements"). Here the same digests map to short sequential ids for one lowering: equal
    data still gets one key (constants shared by the unrolled steps are stored once) and
    different data never shares one. If ExecuTorch no longer names constants this way, this
    does nothing and the keys stay long.
    """
    from executorch.backends.xnnpack.operators import node_visitor

    real = getattr(node_visitor, "hashlib", None)
    if real is None or not hasattr(real, "sha256"):  # pragma: no cover
        yield
        return
    ids: dict[bytes, str] = {}

    class _ShortDigest:
        def __init__(self, data=b""):
            self._digest = real.sha256(data).digest()

        def hexdigest(self) -> str:
            return ids.setdefault(self._digest, format(len(ids), "x"))

    node_visitor.hashlib = type("hashlib", (), {"sha256": _ShortDigest})
    try:
        yield
    finally:
        node_visitor.hashlib = real


def _conv_visitor():
    """XNNPACK's serializer class for convolutions (KeyError if ExecuTorch no longer registers one)."""
    import executorch.backends.xnnpack.operators  # noqa: F401 (registers the visitors)
    from executorch.backends.xnnpack.operators.node_visitor import _node_visitor_dict

    return _node_visitor_dict[CONV_TARGET]


@contextlib.contextmanager
def transient_conv_indirection():
    """Serialize every XNNPACK convolution with ``XNN_FLAG_TRANSIENT_INDIRECTION_BUFFER``.

    XNNPACK's convolutions read their input through an indirection buffer (a pointer per output
    pixel and kernel tap: 1.2 MB for a 3x3 conv at 128 x 128). By default each conv keeps its own
    for the program's lifetime, so the buffers of all convs add up: they were the larger part of
    the phone program's peak memory. With the flag (the same one as TFLite's XNNPACK delegate
    option) each conv rebuilds its buffer at setup inside the runtime's planned workspace, where
    convs that do not overlap reuse the same bytes. ExecuTorch's conv visitor always writes flags
    0 and its runtime passes no runtime-wide flag, so the flag is set on the serialized nodes.
    """
    from executorch.backends.xnnpack.serialization.xnnpack_graph_schema import XNNConv2d, XNNDepthwiseConv2d
    from executorch.backends.xnnpack.utils.xnnpack_constants import XNN_FLAG_TRANSIENT_INDIRECTION_BUFFER

    conv = _conv_visitor()
    real = conv.define_node

    def define_node(self, node, xnn_graph, *args, **kwargs):
        real(self, node, xnn_graph, *args, **kwargs)
        written = xnn_graph.xnodes[-1].xnode_union
        if isinstance(written, (XNNConv2d, XNNDepthwiseConv2d)):  # XNNPACK's deconvolution takes no such flag
            written.flags |= XNN_FLAG_TRANSIENT_INDIRECTION_BUFFER

    conv.define_node = define_node
    try:
        yield
    finally:
        conv.define_node = real


def _one_scale(node) -> bool:
    """Whether every input of a concatenation is dequantized with its output's quantization."""
    from executorch.backends.xnnpack.utils.quant_utils import is_dequant, is_quant

    users = list(node.users)
    if len(users) != 1 or not is_quant(users[0]) or not all(is_dequant(i) for i in node.all_input_nodes):
        return False
    return all(tuple(i.args[1:]) == tuple(users[0].args[1:]) for i in node.all_input_nodes)


def int8_partitioner():
    """XNNPACK partitioner for programs quantized by :func:`quantize_int8`.

    The stock partitioner reads ``dequantize -> op -> quantize`` around ANY op as a quantized op
    and hands it to XNNPACK in int8. Only the ops the quantizer chose to run in int8 should be:
    the GEMMs, the adds and multiplies of int8 tensors and the concatenations whose inputs share
    the output's scale. A concatenation of int8 tensors with different scales is also that
    pattern, and XNNPACK's int8 concatenation refuses it at load ("Failed to create cat2 node ...
    xnn_status_invalid_parameter"), so such a one stays fp32. Every other op is partitioned as
    fp32, so the delegate computes exactly the q/dq graph that was calibrated: explicit converts
    where int8 meets fp32.
    """
    from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS
    from executorch.backends.xnnpack.partition.config.gemm_configs import GEMMConfig
    from executorch.backends.xnnpack.partition.config.generic_node_configs import (
        AddConfig,
        CatConfig,
        DeQuantizedPerTensorConfig,
        GenericNodePartitionerConfig,
        MulConfig,
        QuantizedPerTensorConfig,
    )
    from executorch.backends.xnnpack.partition.config.xnnpack_config import ConfigPrecisionType
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    class OneScaleCat(CatConfig):
        def get_node_and_deps(self, node, ep):
            return super().get_node_and_deps(node, ep) if _one_scale(node) else [node]

    def chosen(cfg):
        if cfg is CatConfig:
            return OneScaleCat
        if (not issubclass(cfg, GenericNodePartitionerConfig) or issubclass(cfg, GEMMConfig)
                or cfg in (AddConfig, MulConfig, QuantizedPerTensorConfig, DeQuantizedPerTensorConfig)):
            return cfg
        return type(f"{cfg.__name__}Fp32", (cfg,), {"supported_precision_types": lambda self: [ConfigPrecisionType.FP32]})

    return XnnpackPartitioner(configs=[chosen(c) for c in ALL_PARTITIONER_CONFIGS])


def workarounds_apply() -> list[str]:
    """What no longer holds in the installed ExecuTorch (empty when every workaround applies)."""
    problems = []
    from executorch.backends.xnnpack.operators import node_visitor

    if not hasattr(getattr(node_visitor, "hashlib", None), "sha256"):
        problems.append("executorch.backends.xnnpack.operators.node_visitor no longer uses hashlib.sha256: "
                        "compact_constant_keys does nothing")
    try:
        from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS
        from executorch.backends.xnnpack.partition.config.generic_node_configs import GenericNodePartitionerConfig

        if not any(issubclass(c, GenericNodePartitionerConfig) for c in ALL_PARTITIONER_CONFIGS):
            problems.append("ALL_PARTITIONER_CONFIGS holds no GenericNodePartitionerConfig: int8_partitioner "
                            "changes nothing")
    except ImportError as e:
        problems.append(f"int8_partitioner's imports moved: {e}")
    try:
        from executorch.backends.xnnpack.serialization.xnnpack_graph_schema import XNNConv2d

        _conv_visitor()
        if "flags" not in XNNConv2d.__dataclass_fields__:
            problems.append("XNNConv2d has no flags field: transient_conv_indirection cannot set its flag")
    except (ImportError, KeyError) as e:
        problems.append(f"transient_conv_indirection finds no XNNPACK conv visitor: {e!r}")
    return problems
