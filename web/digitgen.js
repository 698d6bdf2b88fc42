/**
 * digitgen in the browser: load an ONNX generator that follows the digitgen contract and make
 * handwritten digits with onnxruntime-web (WebAssembly). The same (model, seed, digits) give the uint8
 * images of the Python runtime, `digitgen.DigitGenerator`, at most one level off on a few pixels.
 *
 *   import { DigitGenerator } from "./digitgen.js";
 *   const gen = await DigitGenerator.load("generator.onnx");
 *   const { images, labels, seconds } = await gen.generate({ count: 16, digits: [4, 2], seed: 7 });
 *
 * `images` holds count * 28 * 28 bytes, digit after digit, row after row, 0 = black background.
 */
import * as ort from "./ort.wasm.min.mjs";

export const NOISE_SCHEME = "splitmix64-boxmuller-v1";
export const CONTRACT_VERSION = "1";
export const IMAGE_SIZE = 28;
// the newest ai.onnx opset this page's onnxruntime-web (1.30.0) runs, as export/tolerances.py's PAGE_OPSET: a
// newer model is refused in these words, not onnxruntime-web's ("Opset 28 is under development")
const PAGE_OPSET = 26;
// how far outside 0 to 1 a pixel may lie, as the Python runtime's PIXEL_SLACK: half a grey level, which rounding
// takes back, not a graph that returns -1 to 1 or 0 to 255
const PIXEL_SLACK = 0.5 / 255;
export const MAX_LATENT_DIM = 4096; // bounds of the contract check, as runtime/contract.py
export const MAX_CLASSES = 256;
export const MAX_SEED = 2n ** 64n - 1n;
export const MAX_COUNT = 100_000; // 78 MB of images; larger requests belong to the Python runtime
export const MAX_BATCH_SIZE = 8192; // digits in one model call, as in the Python runtime (more run out of memory)
export const DEFAULT_BATCH_SIZE = 64;
const PIXELS = IMAGE_SIZE * IMAGE_SIZE;

// Typed errors, named as in the Python runtime (digitgen/runtime/errors.py).
export class DigitgenError extends Error {
  get name() {
    return this.constructor.name;
  }
}
export class ModelNotFoundError extends DigitgenError {}
export class InvalidModelError extends DigitgenError {}
export class ModelContractError extends DigitgenError {}
export class ProviderUnavailableError extends DigitgenError {}
export class InvalidRequestError extends DigitgenError {}
export class ModelRunError extends DigitgenError {}

const MAX_SHOWN = 1024; // characters of a value an error quotes, as runtime/text.py's quoted() and the HTTP server
const NAMED_BAD_DIGITS = 5; // a refusal names the first few bad digits of a list, then counts the rest

// What Python's str.isspace() takes for whitespace (its `\s`, which int(), float() and the CLI's patterns strip):
// not JavaScript's \s, which adds U+FEFF and leaves out U+0085 and U+001C-U+001F.
const SPACE = "[\\t\\n\\v\\f\\r\\x1c-\\x1f \\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000]";
const padded = (core) => new RegExp(`^${SPACE}*${core}${SPACE}*$`, "u");
const PADDING = new RegExp(`^${SPACE}+|${SPACE}+$`, "gu"); // what Python's str.strip() takes off
// Characters Python's repr() escapes in a string: what str.isprintable() refuses (a space aside)
const NOT_PRINTABLE = /[\p{Cc}\p{Cf}\p{Cs}\p{Co}\p{Cn}\p{Zl}\p{Zp}\p{Zs}]/u;

/** Whether `text` holds nothing but whitespace (an empty field: the default). */
export function isBlank(text) {
  return padded("").test(text);
}

// Characters runtime/text.py's printable() escapes in a name it shows: control, format, line and paragraph separators
const ESCAPED_IN_NAMES = /[\p{Cc}\p{Cf}\p{Zl}\p{Zp}\p{Cs}]/u;

/** `char` as Python's unicode_escape writes it: \n, \x85, \u200b, \U0001f600. */
function escaped(char) {
  const named = { "\n": "\\n", "\r": "\\r", "\t": "\\t" };
  if (char in named) return named[char];
  const code = char.codePointAt(0);
  const [prefix, width] = code < 0x100 ? ["x", 2] : code < 0x10000 ? ["u", 4] : ["U", 8];
  return `\\${prefix}${code.toString(16).padStart(width, "0")}`;
}

/** `text` with its invisible characters escaped, so that a name (a model's, a link parameter's) shows on one line,
 * as it is (runtime/text.py's printable()). */
export function printable(text) {
  return [...text].map((char) => (ESCAPED_IN_NAMES.test(char) ? escaped(char) : char)).join("");
}

/** `text` in quotes with its invisible characters escaped, as Python's repr() writes a str (what the CLI shows). */
function quoted(text) {
  const quote = text.includes("'") && !text.includes('"') ? '"' : "'";
  const escapes = { "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", [quote]: `\\${quote}` };
  let out = "";
  for (const char of text) {
    if (char in escapes) out += escapes[char];
    else out += char !== " " && NOT_PRINTABLE.test(char) ? escaped(char) : char;
  }
  return quote + out + quote;
}

/** A float as Python's repr() writes it: 0.0, -0.0, 0.05, 1e-05, 1e+16, inf, nan. */
export function pythonFloat(x) {
  if (Number.isNaN(x)) return "nan";
  if (!Number.isFinite(x)) return x > 0 ? "inf" : "-inf";
  if (x === 0) return Object.is(x, -0) ? "-0.0" : "0.0";
  const [mantissa, power] = x.toExponential().split("e"); // the shortest digits that read back as x
  const sign = x < 0 ? "-" : "";
  const digits = mantissa.replace(/^-/, "").replace(".", "");
  const e = Number(power);
  if (e < -4 || e >= 16) {
    const m = digits.length > 1 ? `${digits[0]}.${digits.slice(1)}` : digits;
    return `${sign}${m}e${e < 0 ? "-" : "+"}${String(Math.abs(e)).padStart(2, "0")}`;
  }
  if (e < 0) return `${sign}0.${"0".repeat(-e - 1)}${digits}`;
  return `${sign}${digits.slice(0, e + 1).padEnd(e + 1, "0")}.${digits.slice(e + 1) || "0"}`;
}

/** `text`, or its first `limit` characters and its whole length (runtime/text.py's cut). */
export function cut(text, limit) {
  const chars = [...text];
  if (chars.length <= limit) return text;
  return `${chars.slice(0, limit).join("")}... (${chars.length.toLocaleString("en")} characters)`;
}

/** `value` as an error quotes it, in the CLI's words: a string as Python's repr() writes it, a number as an int
 * or (`asFloat`, or not whole) a float; at most MAX_SHOWN characters, then the value's length. */
export function show(value, asFloat = false) {
  let text = String(value);
  if (typeof value === "string") text = quoted(value);
  else if (typeof value === "number") text = asFloat || !Number.isInteger(value) ? pythonFloat(value) : text;
  const shown = [...text]; // characters as Python counts them: an emoji is one, never cut in half
  if (shown.length <= MAX_SHOWN) return text;
  const length = typeof value === "string" ? [...value].length : shown.length;
  return `${shown.slice(0, MAX_SHOWN).join("")}... (${length.toLocaleString("en")} characters)`;
}

/** The refusal of digits that are not classes of a model, each named once (the first few of many), as the CLI says it. */
function notClassesMessage(shown, numClasses) {
  const unique = [...new Set(shown)];
  const range = `(0-${numClasses - 1})`;
  if (unique.length === 1) return `digit ${unique[0]} is not a class of this model ${range}`;
  const more =
    unique.length > NAMED_BAD_DIGITS ? ` and ${(unique.length - NAMED_BAD_DIGITS).toLocaleString("en")} more` : "";
  return `digits ${unique.slice(0, NAMED_BAD_DIGITS).join(", ")}${more} are not classes of this model ${range}`;
}

const INTEGER_TEXT = padded("([+-]?)([0-9]+)"); // runtime/text.py's INTEGER_TEXT
const LONGEST_NUMBER = 40; // significant digits read as a number, as the CLI reads them

/** `text` as a BigInt when it is an integer, as the CLI reads one (runtime/text.py's read_integer), else
 * `text` itself, for a check to refuse in the CLI's words. */
export function readInteger(text) {
  const match = INTEGER_TEXT.exec(text);
  const digits = match === null ? "" : match[2].replace(/^0+(?=.)/, "");
  return match === null || digits.length > LONGEST_NUMBER ? text : BigInt(match[1] + digits);
}

/** An integer given as a number, BigInt or decimal string, as a BigInt; null for anything else. */
function toBigInt(value) {
  if (typeof value === "bigint") return value;
  if (typeof value === "number") return Number.isSafeInteger(value) ? BigInt(value) : null;
  if (typeof value === "string") {
    const read = readInteger(value);
    return typeof read === "bigint" ? read : null;
  }
  return null;
}

/** `value` as a BigInt in [min, max] (BigInts), or an InvalidRequestError that names it. */
export function checkInteger(value, name, min, max) {
  if (typeof value === "number" && Number.isInteger(value) && !Number.isSafeInteger(value)) {
    throw new InvalidRequestError(
      `${name} ${value} is past 2^53 - 1, where a JavaScript number no longer holds every integer; give it as a BigInt or a string`,
    );
  }
  const n = toBigInt(value);
  if (n === null || n < min || n > max) {
    throw new InvalidRequestError(`${name} must be an integer from ${min} to ${max}, got ${show(value)}`);
  }
  return n;
}

const DIGIT_IN_LIST = padded("[+-]?[0-9]+"); // signed as ?digit= reads one: -0 and +7 are classes

/** "0,3,7" -> [0n, 3n, 7n], as the CLI and the server read `digits` (digitgen/runtime/generator.py's
 * parse_digit_list); whether each is a class of the model is for DigitGenerator.checkDigits to say. */
export function parseDigitList(text) {
  const parts = text.split(",");
  if (!parts.every((part) => DIGIT_IN_LIST.test(part))) {
    throw new InvalidRequestError(`${show(text)} is not a comma-separated list of digits such as 0,3,7`);
  }
  return parts.map((part) => readInteger(part));
}

// ---- Noise: scheme splitmix64-boxmuller-v1 (digitgen/runtime/noise.py), 64-bit arithmetic on BigInts.

const wrap = (x) => BigInt.asUintN(64, x);
const GOLDEN = 0x9e3779b97f4a7c15n;

/** SplitMix64's finalizer. */
function mix(x) {
  x = wrap((x ^ (x >> 30n)) * 0xbf58476d1ce4e5b9n);
  x = wrap((x ^ (x >> 27n)) * 0x94d049bb133111ebn);
  return x ^ (x >> 31n);
}

/** `z` for the digits `start .. stop-1` of `seed`: (stop - start) * size float32s, digit after digit. */
export function standardNormal(seed, start, stop, size, truncation = null) {
  const stream = mix(wrap(checkInteger(seed, "seed", 0n, MAX_SEED) + GOLDEN));
  const bound = checkTruncation(truncation);
  const z = new Float32Array((stop - start) * size);
  for (let index = start; index < stop; index++) {
    const values = normals(mix(stream ^ wrap(BigInt(index) * GOLDEN)));
    const row = Array.from({ length: size + (size % 2) }, () => values.next().value).slice(0, size);
    if (bound !== null) {
      // Truncation: each component beyond +-bound takes the next in-bound value of the stream.
      for (let j = 0; j < size; j++) {
        while (Math.abs(row[j]) > bound) row[j] = values.next().value;
      }
    }
    z.set(row, (index - start) * size);
  }
  return z;
}

/** The Box-Muller values of one digit's key, in stream order: cosine, then sine, of each word pair. */
function* normals(key) {
  const uniform = (c) => (Number(mix(wrap(key + BigInt(c + 1) * GOLDEN)) >> 11n) + 0.5) / 2 ** 53;
  for (let c = 0; ; c += 2) {
    const radius = Math.sqrt(-2 * Math.log(uniform(c)));
    const angle = 2 * Math.PI * uniform(c + 1);
    yield radius * Math.cos(angle);
    yield radius * Math.sin(angle);
  }
}

/** The smallest truncation accepted, as in the Python runtime: the redraw takes about 1 / (0.8 T) values per component. */
export const MIN_TRUNCATION = 0.1;

/** null (no truncation) or a finite number of at least MIN_TRUNCATION. */
export function checkTruncation(value) {
  if (value === null || value === undefined) return null; // "" is refused, as Python refuses it
  const bound = typeof value === "string" ? parseDecimal(value) : typeof value === "bigint" ? Number(value) : value;
  if (typeof bound !== "number" || !(bound >= MIN_TRUNCATION) || !Number.isFinite(bound)) {
    throw new InvalidRequestError(`truncation must be a finite number >= ${MIN_TRUNCATION}, got ${show(value, true)}`);
  }
  return bound;
}

// A decimal number as the CLI and the HTTP server read one (runtime/text.py's DECIMAL_TEXT): ASCII digits,
// no "_" grouping, no 0x, an exponent of at most three digits.
const DECIMAL = padded("([+-]?(?:[0-9]+(?:\\.[0-9]*)?|\\.[0-9]+)(?:[eE][+-]?[0-9]{1,3})?)");

/** `text` as a number if DECIMAL reads it, else NaN. */
function parseDecimal(text) {
  const match = DECIMAL.exec(text);
  return match === null ? NaN : Number(match[1]);
}

/** `text` as a number when it is a decimal one, as the CLI reads it (runtime/text.py's read_number), else
 * `text` itself, for a check to refuse in the CLI's words. */
export function readNumber(text) {
  const number = parseDecimal(text);
  return Number.isNaN(number) ? text : number;
}

/** Floats in [0, 1] to bytes as numpy's `rint(clip(x, 0, 1) * float32(255))`: float32 product, half to even. */
export function toUint8(floats) {
  const bytes = new Uint8Array(floats.length);
  for (let i = 0; i < floats.length; i++) {
    const v = Math.fround(Math.min(Math.max(floats[i], 0), 1) * 255);
    const r = Math.round(v);
    bytes[i] = r - v === 0.5 && r % 2 === 1 ? r - 1 : r;
  }
  return bytes;
}

// ---- The model file: a minimal protobuf reader, enough for the graph's inputs/outputs and metadata_props.

const START_GROUP = 3;
const END_GROUP = 4;
const MAX_NESTING = 100; // protobuf's own limit on nesting (digitgen/runtime/external_data.py)

/** Fields of one protobuf message: field number -> list of values (numbers for varints, bytes for the rest). */
function readMessage(bytes) {
  const fields = new Map();
  let pos = 0;
  const varint = () => {
    let value = 0;
    for (let shift = 0; shift < 70; shift += 7) {
      if (pos >= bytes.length) throw new Error("truncated varint");
      const byte = bytes[pos++];
      value += (byte & 0x7f) * 2 ** shift;
      if (byte < 0x80) return value;
    }
    throw new Error("varint longer than 10 bytes");
  };
  const skip = (n) => {
    if (pos + n > bytes.length) throw new Error("field runs past the end");
    pos += n;
    return bytes.subarray(pos - n, pos);
  };
  const value = (wire) => {
    if (wire === 0) return varint();
    if (wire === 1) return skip(8);
    if (wire === 2) return skip(varint());
    if (wire === 5) return skip(4);
    throw new Error(`unsupported wire type ${wire}`);
  };
  // proto2's groups (deprecated), an unknown field a writer may leave: skipped as protobuf and onnxruntime skip them
  const skipGroup = (field) => {
    const open = [field];
    while (open.length) {
      const key = varint();
      const inner = Math.floor(key / 8);
      const wire = key % 8;
      if (inner === 0) throw new Error("field number 0");
      if (wire === START_GROUP) {
        if (open.length >= MAX_NESTING) throw new Error(`groups nested more than ${MAX_NESTING} deep`);
        open.push(inner);
      } else if (wire === END_GROUP) {
        if (open.pop() !== inner) throw new Error("a group ends with another group's number");
      } else value(wire);
    }
  };
  while (pos < bytes.length) {
    const key = varint();
    const field = Math.floor(key / 8);
    const wire = key % 8;
    if (field === 0) throw new Error("field number 0");
    if (wire === START_GROUP) {
      skipGroup(field);
      continue;
    }
    if (wire === END_GROUP) throw new Error("a group ends that never started");
    if (!fields.has(field)) fields.set(field, []);
    fields.get(field).push(value(wire));
  }
  return fields;
}

// Python's reading: UTF-8 or an error (not U+FFFD), a leading U+FEFF kept as a character of the text
const utf8 = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true });
const first = (fields, field) => fields.get(field)?.[0];
const all = (fields, field) => fields.get(field) ?? [];
const text = (fields, field) => utf8.decode(first(fields, field) ?? new Uint8Array());
// onnxruntime's names of tensor types, as the Python runtime's contract check shows them
const ELEMENT_TYPES = [
  "undefined", "float", "uint8", "int8", "uint16", "int16", "int32", "int64", "string", "bool", "float16", "double",
  "uint32", "uint64", "complex64", "complex128", "bfloat16",
];

/** A graph input or output (ValueInfoProto) as {name, type, shape}: type as onnxruntime names it
 * ("tensor(float)"), shape entries numbers, names, or null where onnxruntime has None (no value, or a negative one). */
function valueInfo(bytes) {
  const info = readMessage(bytes);
  const tensor = first(readMessage(first(info, 2) ?? new Uint8Array()), 1);
  if (!tensor) return { name: text(info, 1), type: "not a tensor", shape: [] };
  const fields = readMessage(tensor);
  const elem = first(fields, 1) ?? 0;
  const shapeBytes = first(fields, 2);
  const shape = shapeBytes
    ? all(readMessage(shapeBytes), 1).map((dim) => {
        const d = readMessage(dim);
        if (d.has(1)) return first(d, 1) < 2 ** 63 ? first(d, 1) : null; // an int64 below 0 reads past 2^63
        return d.has(2) && text(d, 2) !== "" ? text(d, 2) : null;
      })
    : [];
  return { name: text(info, 1), type: `tensor(${ELEMENT_TYPES[elem] ?? `element type ${elem}`})`, shape };
}

/** Metadata entries as {key: value}; null where any is not UTF-8 text (the contract then refuses the model). */
function readMetadata(entries) {
  const metadata = {};
  try {
    for (const entry of entries) {
      const fields = readMessage(entry);
      metadata[text(fields, 1)] = text(fields, 2);
    }
  } catch (error) {
    if (error instanceof TypeError) return null; // the decoder's: not UTF-8
    throw error;
  }
  return metadata;
}

/** {inputs, outputs, metadata, opset, externalData} of ONNX model bytes (externalData: the files its weights are
 * kept in beside it), or an InvalidModelError when they are not ONNX. */
export function describeModel(bytes, source = "the model") {
  try {
    const model = readMessage(bytes);
    if (!model.has(1) || !model.has(7)) throw new Error("no IR version or no graph");
    const graph = readMessage(first(model, 7));
    const initializers = all(graph, 5).map(readMessage);
    // Weights may also be listed as inputs (old IR versions); the runtime does not count them.
    const weights = new Set(initializers.map((tensor) => text(tensor, 8)));
    // a tensor's data_location EXTERNAL (1): its bytes in the file its external_data's "location" names
    const location = (tensor) => all(tensor, 13).map(readMessage).find((entry) => text(entry, 1) === "location");
    const metadata = readMetadata(all(model, 14));
    const opsets = all(model, 8).map(readMessage);
    const standard = opsets.find((opset) => ["", "ai.onnx"].includes(text(opset, 1)));
    return {
      inputs: all(graph, 11).map(valueInfo).filter((input) => !weights.has(input.name)),
      outputs: all(graph, 12).map(valueInfo),
      metadata,
      opset: standard ? (first(standard, 2) ?? 0) : null,
      externalData: [
        ...new Set(initializers.filter((t) => first(t, 14) === 1).map((t) => (location(t) ? text(location(t), 2) : ""))),
      ],
    };
  } catch (error) {
    throw new InvalidModelError(`${source} is not an ONNX model (${error.message})`);
  }
}

// ---- The contract (digitgen/runtime/contract.py): every problem is listed in one error.

/** A shape as the Python runtime shows onnxruntime's: ['batch', 64], None for a dimension without a value. */
export const formatShape = (shape) =>
  `[${shape.map((d) => (d === null ? "None" : typeof d === "string" ? quoted(d) : String(d))).join(", ")}]`;
const isDynamic = (dim) => typeof dim !== "number";

/** Check a describeModel() result; return {latentDim, numClasses}, or throw a ModelContractError. */
export function checkContract({ inputs, outputs, metadata }, source = "the model") {
  if (metadata === null) {
    // cannot be read at all: named alone, as the Python runtime does
    throw new ModelContractError(`${source} does not follow the digitgen model contract: its metadata is not UTF-8 text`);
  }
  const problems = [];
  const names = (list) => list.map((v) => v.name).sort();
  const shownNames = (list) => `[${names(list).map(quoted).join(", ")}]`; // as Python shows a sorted list
  const find = (list, name) => list.find((v) => v.name === name);
  if (names(inputs).join() !== "digit,z") problems.push(`inputs must be 'z' and 'digit', found ${shownNames(inputs)}`);
  if (names(outputs).join() !== "image") problems.push(`output must be 'image', found ${shownNames(outputs)}`);
  const expected = [
    [find(inputs, "z"), "tensor(float)", 2, "float32 [batch, latent_dim]"],
    [find(inputs, "digit"), "tensor(int64)", 1, "int64 [batch]"],
    [find(outputs, "image"), "tensor(float)", 4, "float32 [batch, 1, 28, 28]"],
  ];
  for (const [value, type, rank, wanted] of expected) {
    if (value && (value.type !== type || value.shape.length !== rank)) {
      problems.push(`'${value.name}' must be ${wanted}, found ${value.type} ${formatShape(value.shape)}`);
    } else if (value && !isDynamic(value.shape[0])) {
      problems.push(`'${value.name}' must take any batch size, found a fixed batch of ${value.shape[0]}`);
    }
  }
  const image = find(outputs, "image");
  const imageDims = [1, IMAGE_SIZE, IMAGE_SIZE];
  if (image?.shape.length === 4 && !image.shape.slice(1).every((d, i) => isDynamic(d) || d === imageDims[i])) {
    problems.push(`'image' must be [batch, 1, 28, 28], found ${formatShape(image.shape)}`);
  }
  // an integer as runtime/contract.py reads one: the CLI's reading, and 0 for a value not read (no further check)
  const integer = (key, maximum = null) => {
    const text = metadata[key];
    if (text === undefined || !INTEGER_TEXT.test(text)) {
      problems.push(`metadata '${key}' is missing or not an integer`);
      return 0n;
    }
    const value = readInteger(text);
    if (typeof value === "string") {
      problems.push(`metadata '${key}' is out of range (${cut(text.replace(PADDING, ""), 20)})`);
      return 0n;
    }
    if (value < 1n) problems.push(`metadata '${key}' must be positive, found ${value}`);
    else if (maximum !== null && value > BigInt(maximum)) {
      problems.push(`metadata '${key}' must be at most ${maximum}, found ${value}`);
    }
    return value;
  };
  const latentDim = integer("latent_dim", MAX_LATENT_DIM);
  const numClasses = integer("num_classes", MAX_CLASSES);
  const imageSize = integer("image_size");
  if (imageSize !== 0n && imageSize !== BigInt(IMAGE_SIZE)) {
    problems.push(`metadata 'image_size' must be 28, found ${imageSize}`);
  }
  if (!("contract_version" in metadata)) problems.push("metadata 'contract_version' is missing");
  else if (metadata.contract_version !== CONTRACT_VERSION) {
    problems.push(`contract_version ${show(metadata.contract_version)} is not ${show(CONTRACT_VERSION)}`);
  }
  const z = find(inputs, "z");
  const features = z?.shape.length === 2 ? z.shape[1] : null; // as the runtime: a width only of a z of rank 2
  if (latentDim >= 1n && !isDynamic(features) && BigInt(features) !== latentDim) {
    problems.push(`'z' has ${features} features but metadata latent_dim is ${latentDim}`);
  }
  if (problems.length) {
    throw new ModelContractError(`${source} does not follow the digitgen model contract: ${problems.join("; ")}`);
  }
  return { latentDim: Number(latentDim), numClasses: Number(numClasses) };
}

// ---- The generator.

/** The bytes at `url`; a ModelNotFoundError that names it as `source` when they cannot be had. */
async function fetchModel(url, source) {
  let response;
  try {
    response = await fetch(url);
  } catch (error) {
    let why = ""; // an address that is no URL: the browser's words say so
    try {
      const here = globalThis.location;
      why =
        new URL(url, here?.href).origin === here?.origin
          ? " (the server could not be reached)"
          : " (a model on another site is fetched only if its server allows this page " +
            "(Access-Control-Allow-Origin) and can be reached)";
    } catch {}
    throw new ModelNotFoundError(`could not fetch the model ${source}: ${error.message}${why}`);
  }
  if (!response.ok) {
    throw new ModelNotFoundError(`could not fetch the model ${source}: HTTP ${response.status} ${response.statusText}`);
  }
  try {
    return new Uint8Array(await response.arrayBuffer());
  } catch (error) {
    throw new ModelNotFoundError(`could not read the model ${source}: ${error.message ?? error}`);
  }
}

let configuredThreads = null; // onnxruntime-web reads its thread count once, at its first session

/**
 * onnxruntime-web settings, applied before its first session: they hold for the whole page.
 * One thread by default, isolated page or not: on 2 CPU cores two threads ran this model at batch 64
 * about 40% slower than one. More than one thread needs a cross-origin isolated page (COOP/COEP
 * headers); without it onnxruntime-web falls back to one.
 */
function configureRuntime(threads) {
  if (typeof WebAssembly !== "object") {
    throw new ProviderUnavailableError("WebAssembly is not available in this browser, so the model cannot run here");
  }
  const count = Number(checkInteger(threads ?? 1, "threads", 1n, 64n));
  if (count > 1 && !globalThis.crossOriginIsolated) {
    throw new ProviderUnavailableError(
      `${count} threads need a cross-origin isolated page (served with COOP and COEP headers); ` +
        "this one is not, so onnxruntime-web would run one thread: use threads=1 or such a server",
    );
  }
  if (configuredThreads !== null && count !== configuredThreads) {
    throw new ProviderUnavailableError(
      `onnxruntime-web runs ${configuredThreads} thread(s) on this page, fixed when the first model was opened; ` +
        `it cannot change to ${count}`,
    );
  }
  ort.env.wasm.wasmPaths = new URL("./", import.meta.url).href; // the runtime files lie beside this module
  ort.env.wasm.numThreads = count;
  return count;
}

const GENERATE_OPTIONS = ["count", "digits", "seed", "batchSize", "truncation"];

/** An InvalidRequestError unless `options` is an object of GENERATE_OPTIONS only: a misspelt or Python-named one
 * (`num`, `batch_size`) would otherwise be passed over, and its default drawn in silence. */
function checkOptions(options) {
  if (typeof options !== "object" || options === null || Array.isArray(options)) {
    throw new InvalidRequestError(`generate takes an object of options, e.g. { count: 16 }, got ${show(options)}`);
  }
  const unknown = Object.keys(options).filter((name) => !GENERATE_OPTIONS.includes(name));
  if (unknown.length) {
    throw new InvalidRequestError(
      `generate has no option ${unknown.map((name) => show(name)).join(", ")}; its options are ${GENERATE_OPTIONS.join(", ")}`,
    );
  }
}

export class DigitGenerator {
  constructor(session, description, info, source) {
    this._session = session;
    this._running = new Set(); // model calls in flight, which release() lets finish
    this.source = source;
    this.metadata = description.metadata;
    this.contract = { inputs: description.inputs, outputs: description.outputs };
    this.latentDim = info.latentDim;
    this.numClasses = info.numClasses;
  }

  /** Fetch, check and open a model. `threads`: WebAssembly threads (default 1). */
  static async load(url = "generator.onnx", { threads } = {}) {
    const count = configureRuntime(threads);
    const source = printable(String(url)); // named on one line, whatever the link held
    const bytes = await fetchModel(url, source);
    const description = describeModel(bytes, source);
    const info = checkContract(description, source);
    if (description.opset > PAGE_OPSET) {
      throw new InvalidModelError(
        `${source} is written at ONNX opset ${description.opset}; this page's onnxruntime-web runs opsets up to ` +
          `${PAGE_OPSET}: export it with --opset ${PAGE_OPSET} or lower`,
      );
    }
    if (description.externalData.length) {
      throw new InvalidModelError(
        `${source} keeps its weights in a file beside it (${quoted(description.externalData[0])}), which this page ` +
          "does not load: save the model as one file (onnx.save_model without save_as_external_data)",
      );
    }
    let session;
    configuredThreads = count; // onnxruntime-web fixes its threads on its first start, whether the model loads or not
    try {
      session = await ort.InferenceSession.create(bytes, { executionProviders: ["wasm"] });
    } catch (error) {
      const reason = printable(error.message ?? String(error)); // on one line, whatever the model's names hold
      if (/no available backend/.test(reason)) {
        throw new ProviderUnavailableError(
          `the WebAssembly runtime could not start: ${reason} (its files ort-wasm-simd-threaded.mjs and ` +
            ".wasm lie beside this module: serve the whole built folder, .wasm files as application/wasm)",
        );
      }
      throw new InvalidModelError(`onnxruntime-web could not load ${source}: ${reason}`);
    }
    return new DigitGenerator(session, description, info, source);
  }

  /** The classes to draw in turn: all of them for null/undefined, else a non-empty list of valid digits. */
  checkDigits(digits) {
    if (digits == null) return Array.from({ length: this.numClasses }, (_, d) => d);
    if (typeof digits === "string" || typeof digits[Symbol.iterator] !== "function") {
      throw new InvalidRequestError(`digits must be a list of classes, e.g. [3, 7], got ${show(digits)}`);
    }
    const list = Array.from(digits);
    if (!list.length) throw new InvalidRequestError("the list of digits is empty");
    const classes = list.map(toBigInt);
    const bad = list.filter((d, i) => classes[i] === null || classes[i] < 0n || classes[i] >= BigInt(this.numClasses));
    if (bad.length) throw new InvalidRequestError(notClassesMessage(bad.map(show), this.numClasses));
    return classes.map(Number);
  }

  /** Raw model call: z (B * latentDim float32s) and B labels -> B * 784 floats in [0, 1]. */
  async run(z, labels) {
    if (this._session === null) throw new InvalidRequestError(`the generator of ${this.source} was released`);
    const batch = labels.length;
    let outputs;
    let call;
    try {
      call = this._session.run({
        z: new ort.Tensor("float32", z, [batch, this.latentDim]),
        digit: new ort.Tensor("int64", BigInt64Array.from(labels, BigInt), [batch]),
      });
      this._running.add(call);
      outputs = await call;
    } catch (error) {
      throw new ModelRunError(`${this.source}: the model failed to run: ${printable(String(error.message ?? error))}`);
    } finally {
      this._running.delete(call);
    }
    // the contract lets a model declare its output's dimensions symbolic: what it returns is checked here
    const { type, dims, data } = outputs.image;
    const expected = [batch, 1, IMAGE_SIZE, IMAGE_SIZE];
    if (type !== "float32" || dims.length !== 4 || dims.some((d, i) => d !== expected[i])) {
      throw new ModelContractError(
        `${this.source}: the model returned 'image' of shape (${dims.join(", ")}) (${type}) for ${batch} ` +
          `digits, not (${expected.join(", ")}) (float32)`,
      );
    }
    if (!data.every((pixel) => pixel >= -PIXEL_SLACK && pixel <= 1 + PIXEL_SLACK)) {
      // false for NaN too, which would become black pixels, silently
      if (!data.every(Number.isFinite)) {
        throw new ModelContractError(`${this.source}: the model returned pixels that are NaN or infinite, not 0 to 1`);
      }
      throw new ModelContractError(
        `${this.source}: the model returned pixels outside 0 to 1, not finished pixels (0 black, 1 white)`,
      );
    }
    return data;
  }

  /** Free the model's WebAssembly memory once the model calls in flight have finished; the generator cannot be
   * used afterwards (a generate() in progress stops with an error before its next call). */
  async release() {
    if (this._session === null) return;
    const session = this._session;
    this._session = null;
    await Promise.allSettled(this._running);
    await session.release();
  }

  /** Digits 0 .. count-1 of the sequence defined by (digits, seed); digit i has label digits[i % digits.length].
   * `options` holds any of count, digits, seed, batchSize and truncation; any other name is refused. */
  async generate(options = {}) {
    checkOptions(options);
    const { count = 10, digits = null, seed = 0, batchSize = DEFAULT_BATCH_SIZE, truncation = null } = options;
    const n = Number(checkInteger(count, "number of digits", 1n, BigInt(MAX_COUNT)));
    const bound = checkTruncation(truncation);
    const cycle = this.checkDigits(digits);
    const seedValue = checkInteger(seed, "seed", 0n, MAX_SEED);
    const step = Number(checkInteger(batchSize, "batch size", 1n, BigInt(MAX_BATCH_SIZE)));
    const started = performance.now();
    const labels = Int32Array.from({ length: n }, (_, i) => cycle[i % cycle.length]);
    const images = new Uint8Array(n * PIXELS);
    for (let lo = 0; lo < n; lo += step) {
      const hi = Math.min(lo + step, n);
      const floats = await this.run(standardNormal(seedValue, lo, hi, this.latentDim, bound), labels.subarray(lo, hi));
      images.set(toUint8(floats), lo * PIXELS);
    }
    return { images, labels, seconds: (performance.now() - started) / 1000 };
  }
}
