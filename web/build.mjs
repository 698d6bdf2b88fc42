// Assemble dist/: the page, the module, the model and the onnxruntime-web WebAssembly runtime side by side,
// ready for any static host (every URL is relative).
import { copyFileSync, mkdirSync, rmSync, statSync } from "node:fs";
import { fileURLToPath } from "node:url";

const here = (path) => fileURLToPath(new URL(path, import.meta.url));
const ort = "node_modules/onnxruntime-web/dist/";
const files = {
  "index.html": "index.html",
  "app.js": "app.js",
  "digitgen.js": "digitgen.js",
  "style.css": "style.css",
  "generator.onnx": "../artifacts/generator.onnx",
  "ort.wasm.min.mjs": `${ort}ort.wasm.min.mjs`,
  "ort-wasm-simd-threaded.mjs": `${ort}ort-wasm-simd-threaded.mjs`,
  "ort-wasm-simd-threaded.wasm": `${ort}ort-wasm-simd-threaded.wasm`,
};

rmSync(here("dist"), { recursive: true, force: true });
mkdirSync(here("dist"));
for (const [name, source] of Object.entries(files)) {
  copyFileSync(here(source), here(`dist/${name}`));
  console.log(`dist/${name.padEnd(28)} ${statSync(here(`dist/${name}`)).size.toLocaleString("en").padStart(11)} bytes`);
}
