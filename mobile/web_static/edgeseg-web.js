// The page of `edgeseg export --target web`: one photo -> lesion outline, uncertainty map, mask PNG,
// computed here with ONNX Runtime Web. Pre- and postprocessing follow edgeseg.Segmenter:
// (decoded at full size) -> bilinear (OpenCV INTER_LINEAR geometry) to S x S -> RGB / 255;
// the soft mean upsampled bilinearly to the photo's size, clipped to [-1, 1], thresholded at the sidecar's
// threshold. The initial noise is the file the export drew with Segmenter's own generator and seed.
// Contract for automated checks: input#photo, img#mask, #latency-ms, body[data-state] = done | error, #error.
const $ = (sel) => document.querySelector(sel);
const params = new URLSearchParams(location.search);
const st = { cfg: null, side: null, noise: null, session: null, feeds: null, ep: null };

function setState(s) { document.body.dataset.state = s; }

function fail(msg) {
  $('#error').textContent = msg;
  $('#error').hidden = false;
  $('#status').textContent = 'Failed.';
  setState('error');
}

async function fetchOk(url, kind) {
  const r = await fetch(url);
  if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`);
  return r[kind]();
}

function loadScript(src) {
  return new Promise((resolve, reject) => {
    const s = document.createElement('script');
    s.src = src;
    s.onload = resolve;
    s.onerror = () => reject(new Error(`${src} did not load`));
    document.head.appendChild(s);
  });
}

async function loadModel() {
  const cfg = st.cfg = await fetchOk('site.json', 'json');
  const side = st.side = await fetchOk(cfg.sidecar, 'json');
  const [n, , s] = cfg.noise.shape;
  st.noise = new Float32Array(await fetchOk(cfg.noise.file, 'arrayBuffer'));
  if (st.noise.length !== n * s * s) throw new Error(`${cfg.noise.file} holds ${st.noise.length} values, not ${n * s * s}`);
  await loadScript(cfg.runtime.script);
  ort.env.wasm.wasmPaths = new URL('ort/', location.href).href;  // never a CDN
  if (params.get('threads')) ort.env.wasm.numThreads = parseInt(params.get('threads'), 10);
  const gpu = cfg.runtime.build === 'webgpu' && 'gpu' in navigator && params.get('ep') !== 'wasm';
  const eps = gpu ? ['webgpu', 'wasm'] : ['wasm'];
  const bytes = await fetchOk(cfg.model, 'arrayBuffer');
  st.session = await ort.InferenceSession.create(bytes, { executionProviders: eps, graphOptimizationLevel: 'all' });
  st.ep = eps.join(' > ');
  $('#runtime').textContent = `ONNX Runtime Web ${cfg.runtime.version} (${st.ep}; ${ort.env.wasm.numThreads || 1} ` +
    `thread(s); cross-origin isolated: ${self.crossOriginIsolated}); model ${side.preset}, ${side.quantize === 'int8' ? 'int8' : 'fp32'}, ` +
    `${side.steps} step(s) x ensemble ${side.ensemble}, ${s}x${s}`;
}

async function decode(file) {
  let bmp;
  try {
    bmp = await createImageBitmap(file, { imageOrientation: 'from-image' });
  } catch (e) {
    throw new Error(`${file.name}: not an image this browser can decode (JPEG or PNG expected)`);
  }
  const c = new OffscreenCanvas(bmp.width, bmp.height);
  const g = c.getContext('2d');
  g.drawImage(bmp, 0, 0);
  return { bmp, w: bmp.width, h: bmp.height, rgba: g.getImageData(0, 0, bmp.width, bmp.height).data };
}

// OpenCV INTER_LINEAR's source index and weight for output index d (half-pixel centres, edges clamped).
function taps(outN, inN) {
  const i0 = new Int32Array(outN), i1 = new Int32Array(outN), f = new Float32Array(outN), scale = inN / outN;
  for (let d = 0; d < outN; d++) {
    let x = (d + 0.5) * scale - 0.5, s = Math.floor(x), t = x - s;
    if (s < 0) { s = 0; t = 0; }
    if (s >= inN - 1) { s = inN - 1; t = 0; }
    i0[d] = s; i1[d] = Math.min(s + 1, inN - 1); f[d] = t;
  }
  return { i0, i1, f };
}

// uint8 RGBA W x H -> float32 1 x 3 x S x S in [0, 1] (rounded to uint8 first, as cv2.resize on uint8 is).
function toInput(img, s) {
  const tx = taps(s, img.w), ty = taps(s, img.h), x = new Float32Array(3 * s * s), p = img.rgba;
  for (let y = 0; y < s; y++) for (let xx = 0; xx < s; xx++) {
    const a = ty.f[y], b = tx.f[xx];
    const r0 = ty.i0[y] * img.w, r1 = ty.i1[y] * img.w, c0 = tx.i0[xx], c1 = tx.i1[xx];
    for (let c = 0; c < 3; c++) {
      const v = (1 - a) * ((1 - b) * p[(r0 + c0) * 4 + c] + b * p[(r0 + c1) * 4 + c])
        + a * ((1 - b) * p[(r1 + c0) * 4 + c] + b * p[(r1 + c1) * 4 + c]);
      x[c * s * s + y * s + xx] = Math.min(255, Math.max(0, Math.round(v))) / 255;
    }
  }
  return x;
}

// S x S mean in [-1, 1] -> W x H, bilinear, clipped.
function upsample(mean, s, w, h) {
  const tx = taps(w, s), ty = taps(h, s), out = new Float32Array(w * h);
  for (let y = 0; y < h; y++) {
    const a = ty.f[y], r0 = ty.i0[y] * s, r1 = ty.i1[y] * s;
    for (let x = 0; x < w; x++) {
      const b = tx.f[x], c0 = tx.i0[x], c1 = tx.i1[x];
      const v = (1 - a) * ((1 - b) * mean[r0 + c0] + b * mean[r0 + c1]) + a * ((1 - b) * mean[r1 + c0] + b * mean[r1 + c1]);
      out[y * w + x] = Math.min(1, Math.max(-1, v));
    }
  }
  return out;
}

async function runModel(x) {
  const side = st.side, s = side.image_size[0], n = side.ensemble;
  st.feeds = {
    [side.inputs[0].name]: new ort.Tensor('float32', x, [1, 3, s, s]),
    [side.inputs[1].name]: new ort.Tensor('float32', st.noise, [n, 1, s, s]),
  };
  const t0 = performance.now();
  const out = await st.session.run(st.feeds);
  return { mean: out[side.outputs[0].name].data, ms: performance.now() - t0 };
}

function heat(u) {  // 0 -> dark blue, 0.5 -> red, 1 -> yellow
  const stops = [[13, 8, 135], [204, 71, 120], [240, 249, 33]];
  const t = Math.min(1, Math.max(0, u)) * 2, i = Math.min(1, Math.floor(t)), f = t - i;
  return stops[i].map((c, k) => Math.round(c + f * (stops[i + 1][k] - c)));
}

// Flood fill from `seeds` through pixels of `mask` (w x h, 0/1) equal to `value`, 8- or 4-connected,
// marking `seen` (shared across calls); returns the pixels reached, in the order reached.
function flood(mask, w, h, seeds, value, eight, seen) {
  const queue = [];
  for (const s of seeds) if (mask[s] === value && !seen[s]) { seen[s] = 1; queue.push(s); }
  const steps = eight ? [[-1, -1], [0, -1], [1, -1], [-1, 0], [1, 0], [-1, 1], [0, 1], [1, 1]] : [[0, -1], [-1, 0], [1, 0], [0, 1]];
  for (let head = 0; head < queue.length; head++) {
    const i = queue[head], x = i % w, y = (i - x) / w;
    for (const [dx, dy] of steps) {
      const nx = x + dx, ny = y + dy, j = ny * w + nx;
      if (nx >= 0 && ny >= 0 && nx < w && ny < h && !seen[j] && mask[j] === value) { seen[j] = 1; queue.push(j); }
    }
  }
  return queue;
}

// The sidecar's postprocessing.mask_cleanup, as edgeseg.segmenter.clean_mask does it: "largest-filled"
// keeps the largest 8-connected lesion (the first in raster order on a tie) and fills its holes
// (background not 4-connected to the border).
function cleanMask(mask, w, h, how) {
  if (how !== 'largest-filled') return mask;
  const seen = new Uint8Array(w * h);
  let best = [];
  for (let i = 0; i < w * h; i++) {
    if (!mask[i] || seen[i]) continue;
    const comp = flood(mask, w, h, [i], 1, true, seen);
    if (comp.length > best.length) best = comp;
  }
  if (!best.length) return mask;
  const lesion = new Uint8Array(w * h);
  for (const i of best) lesion[i] = 1;
  const border = [];
  for (let x = 0; x < w; x++) border.push(x, (h - 1) * w + x);
  for (let y = 0; y < h; y++) border.push(y * w, y * w + w - 1);
  const outside = new Uint8Array(w * h);
  flood(lesion, w, h, border, 0, false, outside);
  const out = new Uint8Array(w * h);
  for (let i = 0; i < w * h; i++) out[i] = outside[i] ? 0 : 1;
  return out;
}

function draw(img, m, threshold, cleanup) {
  const { w, h } = img, n = w * h;
  const raw = new Uint8Array(n);
  for (let i = 0; i < n; i++) if (m[i] > threshold) raw[i] = 1;
  const mask = cleanMask(raw, w, h, cleanup);
  let area = 0;
  for (let i = 0; i < n; i++) area += mask[i];
  const outline = $('#outline'); outline.width = w; outline.height = h;
  const g = outline.getContext('2d');
  g.drawImage(img.bmp, 0, 0);
  g.fillStyle = '#ff00ff';
  const r = Math.max(1, Math.round(Math.min(w, h) / 250));
  for (let y = 0; y < h; y++) for (let x = 0; x < w; x++) {
    const i = y * w + x;
    if (mask[i] && (x === 0 || y === 0 || x === w - 1 || y === h - 1 || !mask[i - 1] || !mask[i + 1] || !mask[i - w] || !mask[i + w])) {
      g.fillRect(x - r + 1, y - r + 1, 2 * r - 1, 2 * r - 1);
    }
  }
  const unc = $('#uncertainty'); unc.width = w; unc.height = h;
  const ug = unc.getContext('2d'), ud = ug.createImageData(w, h);
  const mc = new OffscreenCanvas(w, h), mg = mc.getContext('2d'), md = mg.createImageData(w, h);
  for (let i = 0; i < n; i++) {
    const [cr, cg, cb] = heat(1 - Math.abs(m[i]));
    ud.data.set([cr, cg, cb, 255], i * 4);
    const v = mask[i] ? 255 : 0;
    md.data.set([v, v, v, 255], i * 4);
  }
  ug.putImageData(ud, 0, 0);
  mg.putImageData(md, 0, 0);
  return { area, mg: mc };
}

async function maskDataUrl(canvas) {
  const blob = await canvas.convertToBlob({ type: 'image/png' });
  return new Promise((resolve) => { const r = new FileReader(); r.onload = () => resolve(r.result); r.readAsDataURL(blob); });
}

async function segment(file) {
  if (!st.session) return;  // the load error is already shown
  setState('running');
  $('#error').hidden = true; $('#facts').hidden = true;
  $('#status').textContent = `Segmenting ${file.name} ...`;
  try {
    const img = await decode(file);
    const s = st.side.image_size[0];
    const x = toInput(img, s);
    const { mean, ms } = await runModel(x);
    const m = upsample(mean, s, img.w, img.h);
    const { area, mg } = draw(img, m, st.side.threshold, (st.side.postprocessing || {}).mask_cleanup || 'none');
    const url = await maskDataUrl(mg);
    $('#mask').src = url;
    await $('#mask').decode();
    const save = $('#save-mask');
    save.href = url; save.download = `${file.name.replace(/\.[^.]*$/, '')}_mask.png`;
    $('#area-px').textContent = String(area);
    $('#area-fraction').textContent = `${(100 * area / (img.w * img.h)).toFixed(1)}%`;
    $('#latency-ms').textContent = ms.toFixed(2);
    $('#facts').hidden = false;
    $('#status').textContent = `${file.name}: ${img.w}x${img.h}`;
    window.edgeseg.input = x;
    setState('done');
  } catch (e) {
    fail(e.message || String(e));
  }
}

// For benchmarks: run the last photo's input `repeats` times; the model's milliseconds per run.
async function bench(repeats) {
  const times = [];
  for (let i = 0; i < repeats; i++) {
    const t0 = performance.now();
    await st.session.run(st.feeds);
    times.push(performance.now() - t0);
  }
  return times;
}

window.edgeseg = { bench, input: null };
$('#photo').addEventListener('change', (e) => { if (e.target.files.length) segment(e.target.files[0]); });
const drop = $('#drop');
drop.addEventListener('dragover', (e) => { e.preventDefault(); drop.classList.add('over'); });
drop.addEventListener('dragleave', () => drop.classList.remove('over'));
drop.addEventListener('drop', (e) => {
  e.preventDefault(); drop.classList.remove('over');
  if (e.dataTransfer.files.length) segment(e.dataTransfer.files[0]);
});
loadModel().then(() => {
  document.body.dataset.loadMs = performance.now().toFixed(1);
  $('#status').textContent = 'Ready: pick a photo.';
  setState('ready');
}, (e) => fail(`the model did not load: ${e.message || e}`));
