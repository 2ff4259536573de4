// EdgesegBench: MLModel prediction time of an edgeseg .mlpackage (inputs "image", "noise";
// outputs "mean", "std"), written as JSON in the schema of bench/common.py.
//
//   swift run -c release EdgesegBench MODEL.mlpackage [--repeats 20] [--warmup 3]
//        [--compute all|cpuOnly|cpuAndGPU|cpuAndNeuralEngine] [--out result.json]
import CoreML
import Foundation

func arg(_ name: String, _ dflt: String) -> String {
    let a = CommandLine.arguments
    if let i = a.firstIndex(of: name), i + 1 < a.count { return a[i + 1] }
    return dflt
}

func peakRSSMB() -> Double {
    var info = task_vm_info_data_t()
    var count = mach_msg_type_number_t(MemoryLayout<task_vm_info_data_t>.size / MemoryLayout<natural_t>.size)
    let kr = withUnsafeMutablePointer(to: &info) {
        $0.withMemoryRebound(to: integer_t.self, capacity: Int(count)) {
            task_info(mach_task_self_, task_flavor_t(TASK_VM_INFO), $0, &count)
        }
    }
    return kr == KERN_SUCCESS ? Double(info.resident_size_peak) / 1_048_576 : -1
}

func percentile(_ v: [Double], _ q: Double) -> Double {
    let s = v.sorted(); if s.isEmpty { return .nan }
    let pos = q * Double(s.count - 1); let lo = Int(pos.rounded(.down)); let hi = min(lo + 1, s.count - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - Double(lo))
}

let args = CommandLine.arguments
guard args.count > 1 else { print("usage: EdgesegBench MODEL.mlpackage [--repeats N] [--warmup N] [--compute UNITS] [--out FILE]"); exit(2) }
let modelURL = URL(fileURLWithPath: args[1])
let repeats = Int(arg("--repeats", "20"))!, warmup = Int(arg("--warmup", "3"))!
let units: [String: MLComputeUnits] = ["all": .all, "cpuOnly": .cpuOnly, "cpuAndGPU": .cpuAndGPU,
                                       "cpuAndNeuralEngine": .cpuAndNeuralEngine]
let computeName = arg("--compute", "all")
let outPath = arg("--out", "mobile-ios-\(ProcessInfo.processInfo.hostName).json")

// the sidecar written by `edgeseg export --target coreml`
let sidecarURL = URL(fileURLWithPath: args[1] + ".json")
let meta = (try? JSONSerialization.jsonObject(with: Data(contentsOf: sidecarURL))) as? [String: Any] ?? [:]

let config = MLModelConfiguration(); config.computeUnits = units[computeName] ?? .all
let t0 = Date()
let compiled = try MLModel.compileModel(at: modelURL)
let model = try MLModel(contentsOf: compiled, configuration: config)
let loadMs = Date().timeIntervalSince(t0) * 1000

func input(_ name: String) throws -> MLMultiArray {
    let c = model.modelDescription.inputDescriptionsByName[name]!.multiArrayConstraint!
    let a = try MLMultiArray(shape: c.shape, dataType: .float32)
    for i in 0..<a.count { a[i] = NSNumber(value: name == "image" ? Float.random(in: 0...1) : Float.random(in: -2...2)) }
    return a
}
let provider = try MLDictionaryFeatureProvider(dictionary: ["image": try input("image"), "noise": try input("noise")])
for _ in 0..<warmup { _ = try model.prediction(from: provider) }
var times: [Double] = []
for _ in 0..<repeats {
    let s = DispatchTime.now().uptimeNanoseconds
    _ = try model.prediction(from: provider)
    times.append(Double(DispatchTime.now().uptimeNanoseconds - s) / 1e6)
}
let med = percentile(times, 0.5), p25 = percentile(times, 0.25), p75 = percentile(times, 0.75)
let steps = meta["steps"] as? Int, ens = meta["ensemble"] as? Int
let q = meta["quantize"] as? String ?? "none"
let precision = q == "none" ? "fp16" : q
let size = (meta["size_bytes"] as? Double).map { $0 / 1e6 }
var sys = utsname(); uname(&sys)
let machineId = withUnsafeBytes(of: &sys.machine) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) }
let row: [String: Any?] = [
    "config": "\(meta["preset"] as? String ?? "?") .mlpackage \(precision) K\(steps ?? 0) N\(ens ?? 0) (\(computeName))",
    "preset": meta["preset"], "role": nil, "backend": "coreml", "precision": precision, "sampler": "ddim",
    "steps": steps, "ensemble": ens, "default": false, "sweep": false, "params": nil, "gflop_per_call": nil,
    "calls_per_image": (steps ?? 0) * (ens ?? 0), "gflop_per_image": nil,
    "latency_ms": ["median": med, "p25": p25, "p75": p75, "iqr": p75 - p25, "min": times.min()!, "max": times.max()!,
                   "n": times.count, "runs": times],
    "fps": 1000 / med, "extrapolated": false, "extrapolation": nil,
    "peak_rss_mb": peakRSSMB(), "baseline_rss_mb": nil, "model_rss_mb": nil,
    "file": modelURL.lastPathComponent, "file_mb": size, "sha256": meta["sha256"],
    "dice": nil, "dice_std": nil, "dice_images": 0, "dice_reason": "not measured on the phone (see the sidecar's parity)",
    "speedup_vs_paper": nil, "checkpoint": meta["checkpoint"], "status": "ok", "note": "model load+compile \(Int(loadMs)) ms",
]
let doc: [String: Any] = [
    "schema": "edgeseg-bench-mobile", "schema_version": 1, "kind": "mobile-ios",
    "generated": ISO8601DateFormatter().string(from: Date()), "command": args, "quick": false,
    "machine": ["device": machineId, "os": ProcessInfo.processInfo.operatingSystemVersionString,
                "compute_units": computeName, "threads": NSNull()] as [String: Any],
    "settings": ["repeats": repeats, "warmup": warmup,
                 "latency": "MLModel.prediction wall time, random inputs, median and IQR over repeats"],
    "results": [row.mapValues { $0 ?? NSNull() }],
    "notes": ["measured with bench/phone/ios (EdgesegBench)"],
]
let data = try JSONSerialization.data(withJSONObject: doc,
                                      options: [.prettyPrinted, .sortedKeys])
try data.write(to: URL(fileURLWithPath: outPath))
print(String(format: "%@: median %.2f ms (IQR %.2f), %.1f FPS, peak %.0f MB -> %@",
             modelURL.lastPathComponent, med, p75 - p25, 1000 / med, peakRSSMB(), outPath))
