// The digitgen page: form fields -> DigitGenerator.generate -> a contact sheet on <canvas id="sheet">.
// URL parameters: model (default generator.onnx beside the page), threads, and seed, digits, n, truncation to
// preset the fields (digit and count as the HTTP API and the CLI name them too); any other is named on the page.
// document.body.dataset.state: loading -> ready | error, then busy -> drawn | error for each sheet.

const COLUMNS = 10; // the layout of `digitgen generate --format grid`: 10 columns, 2-pixel gray gaps
const GAP = 2;
const GRAY = 128;
const MAX_DIGITS = 100;
const DISPLAY_SCALE = 2;
const SHOWN_METADATA = 40; // characters of a metadata value shown on the page, then its length

// the link's parameter -> the field it presets; count and digit are the HTTP API's and the CLI's names (digit: one
// class, checked as the CLI checks --digit)
const FIELD_PARAMS = {
  seed: "seed",
  digits: "digits",
  digit: "digits",
  n: "count",
  count: "count",
  truncation: "truncation",
};
const PAGE_PARAMS = ["model", "threads"];
// what sharing platforms and campaign links add to a URL: not the user's, and passed over in silence
const ADDED_BY_PLATFORMS = /^(utm_\w+|fbclid|gclid|msclkid|mc_eid)$/;

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
// field -> what is wrong with the value the link put there, which the field's own reading would take (a blank
// digits= for all digits) or cannot judge (digit=0,3,7 is no one class); said once, then the field is the user's
const linkRefusals = new Map();
// field -> the link's text, where the field could not hold it as given (a text field drops line breaks: seed=4%0A2
// would read as 42): read in its place, as the CLI would read it, the first time
const linkText = new Map();
const setState = (state) => (document.body.dataset.state = state);
let digitgen; // the module digitgen.js, imported by main()

/** Show `error` (an Error or words), one line of the box per line of its message; the line of each bad field it
 * names (`error.fields`: [field, message] pairs) gets the id error-FIELD, which that field's description points to. */
function showError(error) {
  const lines = (error instanceof Error ? error.message : String(error)).split("\n");
  const fieldOf = new Map((error?.fields ?? []).map(([field, message]) => [message, field]));
  $("error").replaceChildren(
    ...lines.map((line) => {
      const shown = Object.assign(document.createElement("span"), { className: "line", textContent: line });
      if (fieldOf.has(line)) shown.id = `error-${fieldOf.get(line)}`;
      return shown;
    }),
  );
  $("error").hidden = false;
  setState("error");
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

/**
 * Draw `count` digits at scale 1 as Python's contact sheet does: digit k at column k % 10, row floor(k / 10),
 * gray gaps around every cell, unused cells gray.
 */
function drawSheet(images, count, size, description) {
  const canvas = $("sheet");
  const cell = size + GAP;
  canvas.width = COLUMNS * cell + GAP;
  canvas.height = Math.ceil(count / COLUMNS) * cell + GAP;
  canvas.style.width = `${canvas.width * DISPLAY_SCALE}px`;
  canvas.setAttribute("aria-label", description);
  canvas.hidden = false;
  const context = canvas.getContext("2d");
  const sheet = context.createImageData(canvas.width, canvas.height);
  const rgba = sheet.data;
  rgba.fill(GRAY);
  for (let k = 0; k < count; k++) {
    const left = GAP + (k % COLUMNS) * cell;
    const top = GAP + Math.floor(k / COLUMNS) * cell;
    for (let y = 0; y < size; y++) {
      for (let x = 0; x < size; x++) {
        const at = ((top + y) * canvas.width + left + x) * 4;
        rgba[at] = rgba[at + 1] = rgba[at + 2] = images[(k * size + y) * size + x];
      }
    }
  }
  for (let at = 3; at < rgba.length; at += 4) rgba[at] = 255;
  context.putImageData(sheet, 0, 0);
}

/** The model's inputs and outputs, and what its metadata says about training and quality. */
function describe(gen) {
  const rows = [...gen.contract.inputs.map((v) => ["input", v]), ...gen.contract.outputs.map((v) => ["output", v])];
  $("contract").replaceChildren(
    ...rows.map(([kind, v]) => {
      const row = document.createElement("tr");
      for (const cell of [kind, v.name, v.type, digitgen.formatShape(v.shape)]) { // as `digitgen info` shows them
        row.append(Object.assign(document.createElement("td"), { textContent: cell }));
      }
      return row;
    }),
  );
  const m = gen.metadata;
  // a value of the model's own, on one line and cut short, as `digitgen info` escapes it: a file may hold anything
  const shown = (text) => digitgen.printable(digitgen.cut(text, SHOWN_METADATA));
  $("summary").textContent =
    `${gen.source}: latent size ${gen.latentDim}, ${gen.numClasses} classes, ${shown(m.precision ?? "unknown")} ` +
    `weights, contract version ${m.contract_version}, noise ${digitgen.NOISE_SCHEME}.`;
  const percent = (x) => `${(100 * x).toFixed(2)}%`;
  const count = (x) => x.toLocaleString("en");
  const facts = [
    ["Class accuracy", ["quality_class_accuracy", "quality_min_digit_accuracy"], (acc, worst) =>
      `${percent(acc)} (worst digit: ${percent(worst)})`],
    ["FID", ["quality_fid", "quality_real_fid"], (fid, real) =>
      `${fid.toFixed(2)} (a real MNIST sample: ${real.toFixed(2)})`],
    ["Precision", ["quality_precision", "quality_real_precision"], (p, real) =>
      `${p.toFixed(3)} (real: ${real.toFixed(3)})`],
    ["Recall", ["quality_recall", "quality_real_recall"], (r, real) => `${r.toFixed(3)} (real: ${real.toFixed(3)})`],
    ["Scored on", ["quality_num_samples"], (n) => `${count(n)} generated digits`],
    ["Training", ["train_steps", "train_seed"], (steps, seed) => `${count(steps)} steps, seed ${seed}`],
  ];
  const exact = new Set(["train_seed"]); // seeds may pass 2^53: shown as written, not as a Number
  // a fact whose values are not decimal numbers, as the CLI reads them (another tool's metadata, say; 0x1A), is
  // left out, not shown as NaN or as what JavaScript's Number() makes of it
  const number = (key) => digitgen.readNumber(m[key]);
  const readable = (key) => key in m && (exact.has(key) || Number.isFinite(number(key))); // text is not finite
  $("quality").replaceChildren(
    ...facts
      .filter(([, keys]) => keys.every(readable))
      .flatMap(([label, keys, format]) => [
        Object.assign(document.createElement("dt"), { textContent: label }),
        Object.assign(document.createElement("dd"), {
          textContent: format(...keys.map((key) => (exact.has(key) ? shown(m[key]) : number(key)))),
        }),
      ]),
  );
  $("model").hidden = false;
}

/**
 * The four fields, each checked: the request, or an InvalidRequestError naming every bad field (one per line,
 * in the page's order; `fields` pairs each field with its line); the bad fields are marked aria-invalid,
 * each described by its own line of the error, and the first one takes the focus. Without a model (`gen`
 * null: it could not be loaded), the digits are read but not checked against its classes. A field's problem
 * from the link (`linkRefusals`) is named the first time only.
 */
function readFields(gen) {
  const problems = [];
  const check = (field, read) => {
    try {
      if (linkRefusals.has(field)) throw new Error(linkRefusals.get(field));
      // as typed (or as the link gave it): read and quoted as the CLI reads and quotes its options
      const value = read(linkText.get(field) ?? $(field).value);
      $(field).removeAttribute("aria-invalid");
      $(field).removeAttribute("aria-describedby");
      return value;
    } catch (error) {
      $(field).setAttribute("aria-invalid", "true");
      $(field).setAttribute("aria-describedby", `error-${field}`);
      problems.push([field, error.message]);
      return undefined;
    }
  };
  const request = {
    digits: check("digits", (text) => {
      if (digitgen.isBlank(text)) return null;
      const digits = digitgen.parseDigitList(text);
      return gen ? gen.checkDigits(digits) : digits;
    }),
    count: check("count", (text) =>
      Number(digitgen.checkInteger(digitgen.readInteger(text), "number of digits", 1n, BigInt(MAX_DIGITS))),
    ),
    seed: check("seed", (text) => digitgen.checkInteger(digitgen.readInteger(text), "seed", 0n, digitgen.MAX_SEED)),
    truncation: check("truncation", (text) =>
      digitgen.checkTruncation(digitgen.isBlank(text) ? null : digitgen.readNumber(text)),
    ),
  };
  linkRefusals.clear(); // said: Generate reads the fields as they are from now on
  linkText.clear();
  if (problems.length) {
    document.querySelector("#controls [aria-invalid=true]").focus();
    throw fieldsError(problems);
  }
  return request;
}

/** An InvalidRequestError of `lines` before the `fields` problems ([field, message] pairs), one line each. */
function fieldsError(fields, lines = []) {
  const error = new digitgen.InvalidRequestError([...lines, ...fields.map(([, message]) => message)].join("\n"));
  error.fields = fields;
  return error;
}

/** "N digits in T ms (R digits/s)"; no rate when the sheet took less than one tick of the browser's clock. */
function timing(count, seconds) {
  const digits = `${count} digit${count === 1 ? "" : "s"}`;
  if (!(seconds > 0)) return `${digits} in less than this browser's clock can time`;
  const rate = Math.round(count / seconds).toLocaleString("en");
  return `${digits} in ${(seconds * 1000).toFixed(1)} ms (${rate} digits/s)`;
}

/** "digits 4, 2 in turn": the digits of the cycle that the sheet shows, not all of a longer list (all of the
 * model's `numClasses` without one). */
/** The shortest cycle of classes that labels `count` digits as `digits` does (serve/params.py's shortest_cycle):
 * 1,2,1 for three digits is 1,2, and 1,2,1,2 is 1,2; the same sheet, the same name and words. */
function shortestCycle(digits, count) {
  const used = digits.slice(0, count); // a longer cycle's classes past the count label nothing
  const alike = (period) =>
    !(count > used.length && used.length % period) && used.every((digit, i) => digit === used[i % period]);
  for (let period = 1; ; period++) if (alike(period)) return used.slice(0, period);
}

function describeDigits(digits, count, numClasses) {
  if (!digits) return `digits 0 to ${numClasses - 1} in turn`;
  const shown = shortestCycle(digits, count);
  const cycle = shown.length === 1 ? `digit ${shown[0]}` : `digits ${shown.join(", ")}`;
  const part = digits.length > count ? ` (the first ${count} of ${digits.length})` : "";
  return `${cycle}${part}${shown.length > 1 ? " in turn" : ""}`;
}

let drawing = false; // a sheet is under way
let asked = false; // a sheet was asked for since the one under way started: drawn from the fields after it

/** Draw a sheet of the fields now, or, while one is under way, once it is done: every Generate (a click, Enter
 * in a field) is answered, the last with the fields as they are then, and two sheets never run at once. */
async function requestSheet(gen) {
  asked = true;
  if (drawing) return;
  drawing = true;
  try {
    while (asked) {
      asked = false;
      await draw(gen);
    }
  } finally {
    drawing = false;
  }
}

/** "digits-seed42-n30-d1_2-t1.5.png": a sheet's file named by what it shows, the digits of its cycle that it draws
 * (the same sheet, the same name; a cycle past 16 cut, "_etc"). */
function sheetName(digits, count, seed, truncation) {
  const parts = [`seed${seed}`, `n${count}`];
  const shown = digits && shortestCycle(digits, count);
  if (shown) parts.push(`d${shown.slice(0, 16).join("_")}${shown.length > 16 ? "_etc" : ""}`); // a name stays short
  if (truncation !== null) parts.push(`t${truncation}`);
  return `digits-${parts.join("-")}.png`;
}

/** Resolves once the browser has painted what the page shows now. */
function painted() {
  return new Promise((resolve) => requestAnimationFrame(() => setTimeout(resolve, 0)));
}

async function draw(gen) {
  setState("busy");
  $("sheet").setAttribute("aria-busy", "true"); // dimmed: the sheet there is the last one's
  $("status").textContent = "Generating…"; // above the sheet, where a long sheet's timing line may be off-screen
  $("timing").textContent = "";
  await painted(); // the model runs on this thread: say so on the screen before it holds it
  try {
    const { digits, count, seed, truncation } = readFields(gen);
    const { images, seconds } = await gen.generate({ count, digits, seed, truncation });
    const which = describeDigits(digits, count, gen.numClasses);
    const drawn = `${count} generated handwritten digit${count === 1 ? "" : "s"}`;
    drawSheet(images, count, digitgen.IMAGE_SIZE, `${drawn}, ${which}, seed ${seed}`);
    $("timing").textContent = timing(count, seconds);
    $("download").disabled = false;
    $("download").dataset.filename = sheetName(digits, count, seed, truncation);
    clearError();
    window.digitgenLoadSeconds ??= performance.now() / 1000;
    setState("drawn");
  } catch (error) {
    // the sheet below no longer matches the fields: take it away with its timing and download
    $("sheet").height = 0;
    $("sheet").removeAttribute("aria-label");
    $("sheet").hidden = true; // no sheet: nothing for a screen reader to name
    $("timing").textContent = "";
    $("download").disabled = true;
    showError(error);
  } finally {
    $("sheet").removeAttribute("aria-busy");
    $("status").textContent = ""; // the timing line or the error says how it went: nothing stale to announce
  }
}

/** Save the sheet as a grey-level PNG, as the CLI writes its grid (a canvas would give RGBA); a browser that
 * cannot (no CompressionStream) says so on the page. */
async function download() {
  const canvas = $("sheet");
  const filename = $("download").dataset.filename; // with the pixels: a sheet drawn meanwhile renames the button
  const rgba = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  const grey = rgba.filter((_, i) => i % 4 === 0); // the sheet is grey: red = green = blue
  let png;
  try {
    png = await greyPng(grey, canvas.width, canvas.height);
  } catch (error) {
    showError(new Error(`this browser could not write the PNG (${error.message}); a screenshot keeps the sheet`));
    return;
  }
  const link = Object.assign(document.createElement("a"), {
    href: URL.createObjectURL(png),
    download: filename,
  });
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
}

const CRC_TABLE = Array.from({ length: 256 }, (_, n) => {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  return c >>> 0;
});

/** One PNG chunk: its length, type, data and the CRC-32 of type and data. */
function pngChunk(type, data) {
  const chunk = new Uint8Array(12 + data.length);
  const view = new DataView(chunk.buffer);
  view.setUint32(0, data.length);
  chunk.set(new TextEncoder().encode(type), 4);
  chunk.set(data, 8);
  let crc = 0xffffffff;
  for (const byte of chunk.subarray(4, 8 + data.length)) crc = CRC_TABLE[(crc ^ byte) & 0xff] ^ (crc >>> 8);
  view.setUint32(8 + data.length, (crc ^ 0xffffffff) >>> 0);
  return chunk;
}

/** `pixels` (width x height bytes, row after row) as an 8-bit grey-level PNG. */
async function greyPng(pixels, width, height) {
  const rows = new Uint8Array(height * (width + 1)); // each row after its filter byte, 0 (none)
  for (let y = 0; y < height; y++) rows.set(pixels.subarray(y * width, (y + 1) * width), y * (width + 1) + 1);
  const deflated = new Blob([rows]).stream().pipeThrough(new CompressionStream("deflate"));
  const header = new Uint8Array(13); // width, height, 8 bits, grey levels, deflate, no filter choice, no interlace
  new DataView(header.buffer).setUint32(0, width);
  new DataView(header.buffer).setUint32(4, height);
  header[8] = 8;
  const signature = new Uint8Array([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);
  const data = new Uint8Array(await new Response(deflated).arrayBuffer());
  const chunks = [pngChunk("IHDR", header), pngChunk("IDAT", data), pngChunk("IEND", new Uint8Array(0))];
  return new Blob([signature, ...chunks], { type: "image/png" });
}

// a blank value the field would read as its default, but the CLI and the HTTP API refuse: read as they read it
const BLANK_REFUSED = {
  digits: (text) => digitgen.parseDigitList(text),
  truncation: (text) => digitgen.checkTruncation(digitgen.readNumber(text)),
};

/** What is wrong with the link's parameters, one line each: unknown ones, any given twice (both spellings too). A
 * blank digits or truncation, and (once `gen` has loaded) a digit that is not one class of its model, are their
 * fields' problems instead (`linkRefusals`), named where the field is. */
function linkProblems(gen) {
  const known = [...Object.keys(FIELD_PARAMS), ...PAGE_PARAMS];
  const problems = [];
  const setBy = {};
  for (const name of new Set(params.keys())) {
    if (ADDED_BY_PLATFORMS.test(name)) continue;
    if (!known.includes(name)) {
      problems.push(`the link's parameter ${digitgen.show(name)} is not one this page reads (${known.join(", ")})`);
      continue;
    }
    if (name === "model" && !params.get(name)) {
      problems.push(`the link's model is empty, so the page loaded its own; name a file, e.g. model=generator.onnx`);
    }
    const target = FIELD_PARAMS[name] ?? name;
    if (params.getAll(name).length > 1) problems.push(`the link gives ${name} twice; give it once`);
    else if (setBy[target] === "digits" || setBy[target] === "digit") problems.push("give digits or digit, not both");
    else if (setBy[target]) problems.push(`the link gives ${setBy[target]} and ${name}; give it once`);
    setBy[target] = name;
  }
  for (const [name, read] of Object.entries(BLANK_REFUSED)) {
    if (params.getAll(name).length === 1 && digitgen.isBlank(params.get(name))) {
      try {
        read(params.get(name));
      } catch (error) {
        linkRefusals.set(name, error.message);
      }
    }
  }
  if (params.has("digit") && !params.has("digits")) {
    // one class, read as the CLI reads --digit (+7 and 07 are 7), and the field holds it as a list reads it
    const digit = digitgen.readInteger(params.get("digit"));
    try {
      if (gen) $("digits").value = String(gen.checkDigits([digit])[0]);
    } catch (error) {
      linkRefusals.set("digits", error.message);
    }
    if (!gen && typeof digit !== "bigint") { // no model to name its classes: that it is no integer is enough
      const shown = digitgen.show(params.get("digit"));
      linkRefusals.set("digits", `the link's digit ${shown} is not one class, e.g. digit=7`);
    }
  }
  return problems;
}

async function main() {
  for (const [param, field] of Object.entries(FIELD_PARAMS)) {
    // the field's own name wins (digits over digit, count over n): what the page then says of the field is of it
    if (params.has(param) && (param === field || !params.has(field))) {
      $(field).value = params.get(param);
      if ($(field).value !== params.get(param)) linkText.set(field, params.get(param));
    }
  }
  try {
    // Imported here, not at the top, so that a runtime that fails to load is reported on the page.
    digitgen = await import("./digitgen.js");
  } catch (error) {
    $("status").textContent = "The page's runtime could not be loaded.";
    showError(
      `${error.message} (digitgen.js, or the onnxruntime-web module it imports, ort.wasm.min.mjs: serve the whole ` +
        "built folder, .js and .mjs files as JavaScript)",
    );
    return;
  }
  let gen;
  try {
    gen = await digitgen.DigitGenerator.load(params.get("model") || "generator.onnx", {
      threads: params.has("threads") ? digitgen.readInteger(params.get("threads")) : undefined, // as the fields
    });
  } catch (error) {
    // threads=abc is the link's problem, not the model's: named with the link's other problems
    const link = error instanceof digitgen.InvalidRequestError;
    const runtime = error instanceof digitgen.ProviderUnavailableError;
    $("status").textContent = link
      ? "The link's threads could not be read, so no model was loaded."
      : runtime
        ? "The page's WebAssembly runtime could not start."
        : "The model could not be loaded.";
    const problems = [error.message, ...linkProblems()]; // the link's other problems named too
    try {
      readFields(null); // and the fields it filled that can be read without a model
      showError(problems.join("\n"));
    } catch (badFields) {
      showError(fieldsError(badFields.fields, problems));
    }
    return;
  }
  window.digitgen = gen;
  describe(gen);
  $("status").textContent = `Model ${gen.source} loaded.`;
  setState("ready");
  $("controls").addEventListener("submit", (event) => {
    event.preventDefault();
    requestSheet(gen);
  });
  $("download").addEventListener("click", download);
  $("generate").disabled = false;
  const problems = linkProblems(gen);
  if (problems.length) {
    // the fields hold what the page could read, each checked and marked as Generate would; Generate draws them
    try {
      readFields(gen);
      showError(problems.join("\n"));
    } catch (error) {
      showError(fieldsError(error.fields, problems));
    }
    return;
  }
  await requestSheet(gen);
}

main();
