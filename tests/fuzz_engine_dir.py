"""Property-based mutations of a valid engine directory's manifest, run under a memory limit.

Run by ``test_engine_dir_fuzz.py`` in a child process (``python tests/fuzz_engine_dir.py ENGINE_DIR N``)
whose address space is capped a few GiB above what it uses after start-up, so an allocation sized by
a hostile number fails loudly (MemoryError: a test failure) instead of passing unnoticed, and whose
wall time is capped by the parent, so a hang fails too.  Every mutation must end in a loaded engine
that generates, or in ``EngineDirError`` / ``GenerationError`` -- never another exception.
"""
from __future__ import annotations

import json
import resource
import shutil
import sys
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

WEIRD_TEXT = st.text(alphabet=st.characters(codec="utf-8") | st.sampled_from(["\x00", "\x1b", "\u202e", ".", "/",
                                                                               "\\", "\ud7ff", "\ufeff"]),
                     max_size=40) | st.sampled_from(["..", "../x", "/etc/passwd", "target.onnx", "draft.onnx", ""])
NUMBERS = st.integers(-2**70, 2**70) | st.sampled_from([0, -1, 1, 2, 10**12, 2**31, 2**63, 2**64]) | \
    st.floats(allow_nan=True, allow_infinity=True)
SCALARS = st.none() | st.booleans() | NUMBERS | WEIRD_TEXT
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(WEIRD_TEXT, inner, max_size=4),
                      max_leaves=8)


def paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node[:6]):
            yield from paths(v, (*prefix, i))


def mutate(data, path, action, value, key):
    if not path:
        return value if action == "replace" else data
    parent = data
    for p in path[:-1]:
        parent = parent[p]
    last = path[-1]
    if action == "replace":
        parent[last] = value
    elif action == "delete":
        del parent[last]
    elif action == "insert" and isinstance(parent, dict):
        parent[key] = value
    elif action == "insert":
        parent.insert(last, value)
    elif action == "duplicate" and isinstance(parent, list):
        parent.append(parent[last])
    return data


def check_one(engine_dir: Path, raw: str) -> None:
    from specrt.runtime import Engine
    from specrt.runtime.errors import EngineDirError, GenerationError

    (engine_dir / "manifest.json").write_text(raw, encoding="utf-8", errors="surrogatepass")
    try:
        engine = Engine.load(engine_dir)
    except EngineDirError as e:
        assert str(e), "an error must say what is wrong"
        return
    for action in (lambda: engine.generate([1, 2, 3], max_new_tokens=4, k=engine.manifest.k_values[0]),
                   lambda: engine.chat_prompt([{"role": "user", "content": "hi"}])):
        try:
            action()
        except (EngineDirError, GenerationError):
            pass


def main(src: Path, examples: int) -> int:
    work = Path(tempfile.mkdtemp(prefix="specrt-fuzz-"))
    engine_dir = work / "engine"
    shutil.copytree(src, engine_dir)
    original = json.loads((src / "manifest.json").read_text())
    all_paths = list(paths(original))

    # Cap the address space now that everything is imported: a manifest-sized allocation cannot hide.
    import specrt.runtime  # noqa: F401 -- imports numpy, onnxruntime, tokenizers before the cap
    status = Path("/proc/self/status").read_text().splitlines()
    vm = int(next(line.split()[1] for line in status if line.startswith("VmSize:"))) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + (3 << 30), resource.RLIM_INFINITY))

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(path=st.sampled_from(all_paths), action=st.sampled_from(["replace", "delete", "insert", "duplicate"]),
           value=VALUES | NUMBERS, key=WEIRD_TEXT,
           raw_edit=st.sampled_from([None] * 12 + ["truncate", "duplicate-key", "nan", "deep", "bom"]))
    def fuzz(path, action, value, key, raw_edit):
        data = mutate(json.loads(json.dumps(original)), path, action, value, key)
        raw = json.dumps(data, allow_nan=True)
        if raw_edit == "truncate":
            raw = raw[: len(raw) // 2]
        elif raw_edit == "duplicate-key":
            raw = raw.replace('"format"', '"format": "specrt-engine", "format"', 1)
        elif raw_edit == "nan":
            raw = raw.replace('"max_context": ', '"max_context": NaN, "x": ', 1)
        elif raw_edit == "deep":
            raw = "[" * 100000 + "]" * 100000
        elif raw_edit == "bom":
            raw = "\ufeff" + raw
        check_one(engine_dir, raw)

    try:
        fuzz()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"fuzzed {examples} manifests: every one loaded and generated, or ended in EngineDirError/GenerationError")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), int(sys.argv[2])))
