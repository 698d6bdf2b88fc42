"""Check a built wheel: `digitgen` is its only top-level name and it carries the shipped files."""

import sys
import zipfile

REQUIRED = (
    "digitgen/artifacts/generator.onnx",
    "digitgen/artifacts/classifier.onnx",
    "digitgen/artifacts/MODEL_CARD.md",
    "digitgen/artifacts/samples.png",
    "digitgen/py.typed",
    "digitgen/cli.py",
    "digitgen/__main__.py",
)

names = zipfile.ZipFile(sys.argv[1]).namelist()
top = {name.split("/")[0] for name in names}
dist_info = {t for t in top if t.endswith(".dist-info")}
problems = []
if top - dist_info != {"digitgen"} or len(dist_info) != 1:
    problems.append(f"top-level names {sorted(top)}, expected digitgen and one .dist-info")
problems += [f"missing {path}" for path in REQUIRED if path not in names]
problems += [f"unexpected {name}" for name in names if name.endswith(".pt")]
if problems:
    sys.exit("FAIL: " + "; ".join(problems))
print(f"wheel ok: {len(names)} files, top-level {sorted(top)}")
