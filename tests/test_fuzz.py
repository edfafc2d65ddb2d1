"""Fuzzing of every parser that takes outside input, with a kept corpus (issue 16).

Each parser has one check function that states what must hold for *any* input (only the
project's own errors, no hang, nothing read past the input); a hypothesis test feeds it
generated and mutated inputs, and a replay test feeds it every file of its folder in
``tests/fuzz_corpus/`` (seeds and the regression inputs of fixed crashes, see its README).

Runs:
* default (CI): derandomized, a few dozen to a few hundred examples per test, under a minute
  on two cores: ``pytest -q tests/test_fuzz.py``;
* long: ``TURBOFS_FUZZ_EXAMPLES=5000 pytest -q tests/test_fuzz.py`` (examples per test,
  random seeds; add ``TURBOFS_FUZZ_SEED=N`` to derandomize by a seed of your choice). A
  failing input found this way goes into the corpus folder of its parser.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import shutil
import stat
import struct
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import zstandard
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from server import app as server_app
from server import jsonbody, turbo_ext
from server.errors import DistributionError
from tests.mount_fixtures import build_layout
from tests.ocifixtures import TarEntry as FixtureEntry
from tests.ocifixtures import pax_record
from tests.test_format import sample_index
from turbofs.core import format as fmt
from turbofs.core import image, oci
from turbofs.core.config import RegistryConfig
from turbofs.core.errors import FormatError, NotFound, SourceError, UnsafeEntry
from turbofs.core.fstree import pax_xattrs, split_path
from turbofs.core.layers import LayerStream
from turbofs.core.tar import TarEntry, TarReader
from turbofs.erofs import ErofsCorrupt, ErofsImage, build_erofs, check_erofs

CORPUS = Path(__file__).parent / "fuzz_corpus"
_LONG = os.environ.get("TURBOFS_FUZZ_EXAMPLES")
_SEED = os.environ.get("TURBOFS_FUZZ_SEED")


def fuzz(default: int) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Hypothesis settings of one fuzz test: ``default`` examples, derandomized, unless
    TURBOFS_FUZZ_EXAMPLES asks for a long run."""
    opts = settings(
        max_examples=int(_LONG) if _LONG else default,
        deadline=None,
        derandomize=not _LONG and not _SEED,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )

    def wrap(test: Callable[..., None]) -> Callable[..., None]:
        test = opts(test)
        return seed(int(_SEED))(test) if _SEED else test

    return wrap


def corpus(folder: str) -> list[Any]:
    files = sorted(p for p in (CORPUS / folder).iterdir() if p.is_file() and not p.name.startswith("."))
    return [pytest.param(p, id=p.name) for p in files]


# -- the index decoder ------------------------------------------------------------------

#: generated payloads stay under this, so that an example stays fast (the decompression bomb
#: is a corpus input: tests/fuzz_corpus/index/regress-bomb-256MiB.idx)
_GENERATED_PAYLOAD_MAX = 4 << 20


def _payload(blob: bytes) -> bytes:
    return zstandard.ZstdDecompressor().decompress(blob[fmt.HEADER_SIZE :])


def _wrap(payload: bytes, *, plen: int | None = None, content_size: bool = True) -> bytes:
    comp = zstandard.ZstdCompressor(write_content_size=content_size).compress(payload)
    header = struct.pack("<8sHHIQQ32s", fmt.MAGIC, fmt.VERSION, 0, fmt.HEADER_SIZE,
                         len(payload) if plen is None else plen, len(comp), hashlib.sha256(payload).digest())
    return header + comp


def _call(f: Callable[[], object]) -> None:
    """Run one accessor: it works or raises FormatError (a corrupt index), nothing else."""
    with contextlib.suppress(FormatError):
        f()


def exercise_index(idx: fmt.Index) -> None:
    """The whole reader API of a decoded index, each accessor called as a presentation calls
    it (by inode type): each works or raises FormatError."""
    _call(idx.verify)
    _call(lambda: list(idx.walk()))
    for call in (idx.inode_columns, idx.dirent_columns, idx.ref_columns, idx.xattr_records, idx.chunk_list,
                 idx.blobs, idx.prefetch_order, idx.startup_chunks, lambda: list(idx.chunks())):
        _call(call)
    for ino in range(min(idx.n_inodes, 64)):
        try:
            node = idx.inode(ino)
        except FormatError:
            continue
        _call(lambda: idx.xattrs(ino))  # noqa: B023 (called at once)
        if node.is_dir:
            _call(lambda: [idx.lookup(ino, name) for name, _ in idx.listdir(ino)])  # noqa: B023
        elif node.is_reg:
            def read_all(ino: int = ino, size: int = node.size) -> None:
                pieces = idx.map_range(ino, 0, size)
                assert sum(p.length for p in pieces) == size
                idx.file_refs(ino)
            _call(read_all)
        elif node.is_symlink:
            _call(lambda: idx.readlink(ino))  # noqa: B023
    with contextlib.suppress(FormatError, NotFound):
        idx.resolve(b"a/b/c")


def check_index_blob(blob: bytes) -> None:
    """Any index blob: decodes to an index whose reader API works, or FormatError."""
    try:
        idx = fmt.Index.from_bytes(blob)
    except FormatError:
        return
    exercise_index(idx)


@pytest.fixture(scope="module")
def built_image(tmp_path_factory: pytest.TempPathFactory) -> image.LayoutImage:
    """A small image made by the builder: dirs, a file over several chunks, a hardlink, a
    symlink, a device, xattrs."""
    layers = [[
        FixtureEntry("etc", "dir", mode=0o755),
        FixtureEntry("etc/passwd", data=b"root:x:0:0::/root:/bin/sh\n", xattrs={"user.a": b"1"}),
        FixtureEntry("big", size=3 * 4096 * 4 + 77),
        FixtureEntry("hard", "hardlink", linkname="big"),
        FixtureEntry("lib", "symlink", linkname="usr/lib"),
        FixtureEntry("null", "char", devmajor=1, devminor=3),
    ]]
    return build_layout(tmp_path_factory.mktemp("fuzz-index"), layers, 16 * 1024)


@pytest.fixture(scope="module")
def built_index(built_image: image.LayoutImage) -> bytes:
    return built_image.blob_path(built_image.manifest.index.digest).read_bytes()


_INTERESTING = [0, 1, 2, 7, 8, 63, 64, 0xFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF]


@st.composite
def _mutated_payload(draw: st.DrawFn, base: bytes) -> bytes:
    payload = bytearray(base)
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["byte", "u32", "u64", "cut", "insert", "copy"]))
        pos = draw(st.integers(0, max(len(payload) - 1, 0)))
        if op == "byte" and payload:
            payload[pos] = draw(st.integers(0, 255))
        elif op == "u32":
            payload[pos : pos + 4] = struct.pack("<I", draw(st.sampled_from(_INTERESTING) | st.integers(0, 2**32 - 1)))
        elif op == "u64":
            value = draw(st.sampled_from([2**63 - 1, 2**63, 2**64 - 1, 1 << 40]) | st.integers(0, 2**64 - 1))
            payload[pos : pos + 8] = struct.pack("<Q", value)
        elif op == "cut":
            del payload[pos : pos + draw(st.integers(1, 64))]
        elif op == "insert":
            payload[pos:pos] = draw(st.binary(min_size=1, max_size=32))
        else:  # a record copied over another: plausible values in the wrong place
            src = draw(st.integers(0, max(len(payload) - 1, 0)))
            payload[pos : pos + 16] = payload[src : src + 16]
    return bytes(payload[:_GENERATED_PAYLOAD_MAX])


@fuzz(600)
@given(data=st.data())
def test_index_payload_mutations(data: st.DataObject, built_index: bytes) -> None:
    """Real indexes (the builder's and test_format's), their payload mutated and wrapped with a
    valid header and checksum, so that the decoder's table checks are what stands."""
    base = data.draw(st.sampled_from([_payload(built_index), _payload(sample_index())]))
    check_index_blob(_wrap(data.draw(_mutated_payload(base))))


@fuzz(150)
@given(data=st.data())
def test_index_declared_sizes(data: st.DataObject, built_index: bytes) -> None:
    """Headers that declare payload, header or compressed sizes other than the blob's (huge
    ones included), truncated blobs: refused with FormatError."""
    payload = _payload(data.draw(st.sampled_from([built_index, sample_index()])))
    plen = data.draw(st.sampled_from([0, 1, len(payload) - 1, len(payload) + 1, fmt.MAX_PAYLOAD + 1, 2**64 - 1])
                     | st.integers(0, len(payload) * 2))
    content_size = data.draw(st.booleans())
    good = _wrap(payload, content_size=content_size)
    blob = bytearray(_wrap(payload, plen=plen, content_size=content_size))
    if data.draw(st.booleans()):  # header size and compressed length disagree with the blob
        field = data.draw(st.sampled_from([(12, "<I"), (24, "<Q")]))
        struct.pack_into(field[1], blob, field[0], data.draw(st.sampled_from([0, 1, 2**32 - 1]) | st.integers(0, 4096)))
    if data.draw(st.booleans()):
        blob = blob[: data.draw(st.integers(0, len(blob)))]
    if blob != good:  # any header field or length changed: refused
        with pytest.raises(FormatError):
            fmt.Index.from_bytes(bytes(blob))
    else:
        check_index_blob(bytes(blob))


@fuzz(150)
@given(raw=st.binary(max_size=2048), version=st.integers(0, 3))
def test_index_arbitrary_bytes(raw: bytes, version: int) -> None:
    """Arbitrary bytes as a blob, behind a valid magic, and as a whole payload."""
    with pytest.raises(FormatError):
        fmt.Index.from_bytes(raw)
    check_index_blob(fmt.MAGIC + struct.pack("<H", version) + raw)
    check_index_blob(_wrap(raw))


#: what decoding a corpus index may allocate at most (they are all small; a bomb declares
#: hundreds of MiB)
_INDEX_CORPUS_PEAK = 32 << 20


@pytest.mark.parametrize("path", corpus("index"))
def test_index_corpus(path: Path) -> None:
    """Each kept index blob, with the memory its decoding takes bounded (a bomb refused before
    its declared payload is allocated)."""
    import tracemalloc

    blob = path.read_bytes()
    tracemalloc.start()
    try:
        check_index_blob(blob)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < _INDEX_CORPUS_PEAK, f"{path.name}: decoding took {peak} bytes"


# -- manifest, config and image-index JSON ------------------------------------------------

_JSON_LEAVES = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False)
                | st.text(max_size=20) | st.sampled_from(["sha256:" + "a" * 64, oci.TURBO_INDEX, oci.TURBO_CHUNKS]))
_JSON = st.recursive(_JSON_LEAVES, lambda kids: st.lists(kids, max_size=4)
                     | st.dictionaries(st.text(max_size=12), kids, max_size=4), max_leaves=20)


@st.composite
def _descriptor(draw: st.DrawFn, media_type: str) -> Any:
    desc: dict[str, Any] = {
        "mediaType": draw(st.sampled_from([media_type, oci.OCI_CONFIG]) | _JSON),
        "digest": draw(st.sampled_from(["sha256:" + "a" * 64, "sha512:" + "b" * 128, "md5:x", "sha256:AB"]) | _JSON),
        "size": draw(st.sampled_from([0, 1, 2**63, -1, True, 1.5, "1"]) | _JSON),
    }
    for key in ("annotations", "urls", "platform"):
        if draw(st.booleans()):
            desc[key] = draw(st.dictionaries(st.text(max_size=8), st.text(max_size=8) | _JSON, max_size=3) | _JSON)
    if draw(st.integers(0, 9)) == 0:
        return draw(_JSON)
    return desc


@st.composite
def _manifest(draw: st.DrawFn) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schemaVersion": draw(st.sampled_from([2, 1, "2"])),
        "mediaType": oci.OCI_MANIFEST,
        "config": draw(_descriptor(oci.OCI_CONFIG)),
        "layers": draw(st.lists(_descriptor(oci.TURBO_INDEX), min_size=1, max_size=3)),
    }
    if draw(st.booleans()):
        doc["annotations"] = draw(st.dictionaries(st.text(max_size=8), st.text(max_size=8) | _JSON, max_size=3)
                                  | _JSON)
    if draw(st.booleans()):
        doc[draw(st.text(max_size=8))] = draw(_JSON)
    return doc


def check_json_document(raw: bytes) -> None:
    """Any bytes as a manifest, config or layout index: parsed, or the project's errors."""
    try:
        obj = oci.parse_json(raw, "document")
    except FormatError:
        obj = None
    if obj is not None:
        assert isinstance(obj, dict)
        for value in (obj.get("config"), *(obj.get("manifests") or [] if isinstance(obj.get("manifests"), list) else [])):
            with contextlib.suppress(FormatError):
                oci.Descriptor.from_json(value, "document")
        with contextlib.suppress(FormatError):
            image.is_turbo_manifest(obj)
        manifest = image.ImageManifest(oci.sha256_digest(raw), oci.OCI_MANIFEST, raw, obj, "document")
        with contextlib.suppress(FormatError):
            assert manifest.config.size >= 0
        with contextlib.suppress(FormatError):
            assert all(d.size >= 0 for d in manifest.layers)
    digest = oci.sha256_digest(raw)
    with contextlib.suppress(FormatError):
        parsed = image.parse_manifest(raw, digest)
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in parsed.annotations.items())
    # as the index.json of a layout (whose blobs are all missing)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "index.json").write_bytes(raw)
        with contextlib.suppress(FormatError, NotFound):
            image.open_layout_image(Path(tmp))
    with contextlib.suppress(FormatError):
        config = image.parse_config(raw, oci.Descriptor(oci.OCI_CONFIG, digest, len(raw)))
        with contextlib.suppress(FormatError):
            assert all(d.startswith("sha") for d in config.diff_ids)


@fuzz(200)
@given(doc=_manifest())
def test_manifest_documents(doc: dict[str, Any]) -> None:
    check_json_document(json.dumps(doc).encode())


@fuzz(150)
@given(doc=_JSON, wrap=st.integers(0, 3))
def test_arbitrary_json(doc: Any, wrap: int) -> None:
    """Any JSON value, as a document and as the rootfs of a config."""
    check_json_document(json.dumps(doc).encode())
    check_json_document(json.dumps({"rootfs": {"type": "layers", "diff_ids": doc}} if wrap else doc).encode())


@fuzz(150)
@given(raw=st.binary(max_size=300), nesting=st.integers(0, 3))
def test_json_bytes(raw: bytes, nesting: int) -> None:
    """Bytes that are mostly not JSON: bad encodings, deep nesting, huge numbers, NaN."""
    depth = [0, 100, 5_000, 200_000][nesting]
    check_json_document(b"[" * depth + raw + b"]" * depth)
    check_json_document(b'{"schemaVersion":2,"layers":' + raw + b"}")


@pytest.mark.parametrize("path", corpus("json"))
def test_json_corpus(path: Path) -> None:
    check_json_document(path.read_bytes())


_D64 = "sha256:" + "a" * 64


@pytest.mark.parametrize(("field", "value", "message"), [
    ("annotations", [1], "annotations must map strings to strings"),
    ("annotations", "io.turbofs.index.digest", "annotations must map strings to strings"),
    ("annotations", {"io.turbofs.chunk-size": 65536}, "annotations must map strings to strings"),
    ("annotations", {"a": None}, "annotations must map strings to strings"),
    ("layers", 5, "not a turbo image"),
    ("layers", {"0": {}}, "not a turbo image"),
    ("schemaVersion", 2.0, "schemaVersion must be 2"),
    ("schemaVersion", "2", "schemaVersion must be 2"),
    ("mediaType", 5, "mediaType is not a string"),
    ("mediaType", oci.OCI_INDEX, "is not an image manifest"),
    ("artifactType", ["x"], "artifactType is not a string"),
    ("subject", "sha256:x", "subject: descriptor is not an object"),
    ("config", {"digest": _D64, "size": 2}, "config descriptor has no mediaType"),
    ("config", {"mediaType": oci.OCI_CONFIG, "digest": _D64, "size": True}, "invalid size"),
    ("config", {"mediaType": oci.OCI_CONFIG, "digest": "sha256:AA", "size": 2}, "unsupported digest"),
    ("config", {"mediaType": oci.OCI_CONFIG, "digest": 5, "size": 2}, "has no digest"),
])
def test_manifest_fields_are_typed(field: str, value: Any, message: str) -> None:
    """Issue 16: each field of a turbo manifest has the type the OCI image spec gives it, or
    the manifest is refused with FormatError (annotations of another type than an object once
    raised AttributeError, a number as layers TypeError; non-string annotation values and
    schemaVersion 2.0 were taken)."""
    doc = json.loads((CORPUS / "json" / "seed-turbo-manifest.json").read_bytes())
    raw = json.dumps(doc).encode()
    assert image.parse_manifest(raw, oci.sha256_digest(raw)).annotations == doc["annotations"]
    doc[field] = value
    raw = json.dumps(doc).encode()
    with pytest.raises(FormatError, match=message):
        image.parse_manifest(raw, oci.sha256_digest(raw))
    if field == "layers":
        manifest = image.ImageManifest(oci.sha256_digest(raw), oci.OCI_MANIFEST, raw, doc, "m")
        with pytest.raises(FormatError, match="layers is not a list"):
            manifest.layers  # noqa: B018 (a property)


@pytest.mark.parametrize(("name", "edit", "message"), [
    ("list", lambda index: b"[1]", "not a JSON object"),
    ("manifests-int", lambda index: b'{"schemaVersion": 2, "manifests": 5}', "manifests is not a list"),
    ("manifests-missing", lambda index: b'{"schemaVersion": 2}', "manifests is not a list"),
    ("schema-version", lambda index: json.dumps({**index, "schemaVersion": "2"}).encode(), "schemaVersion"),
    ("media-type", lambda index: json.dumps({**index, "mediaType": oci.OCI_MANIFEST}).encode(), "not an image index"),
    ("annotations", lambda index: json.dumps({**index, "annotations": [1]}).encode(), "annotations"),
    ("nested", lambda index: json.dumps(index).encode()[:-1] + b', "x": ' + b"[" * 5000 + b"]" * 5000 + b"}",
     "nested too deeply"),
    ("int-5000-digits", lambda index: json.dumps(index).encode()[:-1] + b', "x": ' + b"7" * 5000 + b"}", "valid JSON"),
    ("nan", lambda index: json.dumps(index).encode()[:-1] + b', "x": NaN}', "valid JSON"),
    ("manifest-size-wrong", lambda index: json.dumps(
        {**index, "manifests": [{**index["manifests"][0], "size": index["manifests"][0]["size"] + 1}]}).encode(),
     "not of the .* bytes its descriptor gives"),
    ("manifest-size-huge", lambda index: json.dumps(
        {**index, "manifests": [{**index["manifests"][0], "size": 1 << 40}]}).encode(), "over the limit"),
])
def test_layout_index_is_checked(built_image: image.LayoutImage, tmp_path: Path, name: str,
                                 edit: Callable[[dict[str, Any]], bytes], message: str) -> None:
    """Issue 16: a layout's index.json that is not an image index, or that names its manifest
    with a size other than the blob's, is refused with FormatError (``[1]`` once raised
    AttributeError, deep nesting RecursionError, a 5000-digit number ValueError)."""
    root = tmp_path / "layout"
    shutil.copytree(built_image.root, root)
    assert image.open_layout_image(root).manifest.digest == built_image.manifest.digest
    (root / "index.json").write_bytes(edit(json.loads((root / "index.json").read_bytes())))
    with pytest.raises(FormatError, match=message):
        image.open_layout_image(root)


# -- tar headers ------------------------------------------------------------------------

_U32_MAX = 2**32 - 1


def _num_field(width: int, value: int | bytes) -> bytes:
    if isinstance(value, bytes):
        return value[:width].ljust(width, b"\0")
    if 0 <= value < 8 ** (width - 1):
        return b"%0*o\0" % (width - 1, value)
    body = (value % (1 << (8 * (width - 1)))).to_bytes(width - 1, "big")
    return (b"\xff" if value < 0 else b"\x80") + body  # base-256


def _checksummed(block: bytearray, bad: bool) -> bytes:
    block[148:156] = b" " * 8
    total = sum(block) + (1 if bad else 0)
    block[148:156] = b"%06o\0 " % (total % 8**6)
    return bytes(block)


_NUMBERS = (st.integers(0, 4096) | st.sampled_from([_U32_MAX, _U32_MAX + 1, -1, -(2**63), 2**63, 2**90])
            | st.binary(max_size=12))


@st.composite
def _header(draw: st.DrawFn, typeflag: bytes, size: int | bytes) -> bytes:
    block = bytearray(512)
    name = draw(st.binary(max_size=100) | st.sampled_from([b"a", b"dir/", b"../x", b"/abs", b"a\0b", b"./.wh.x"]))
    block[0 : len(name)] = name
    for off, width in ((100, 8), (108, 8), (116, 8), (136, 12), (329, 8), (337, 8)):
        block[off : off + width] = _num_field(width, draw(_NUMBERS))
    block[124:136] = _num_field(12, size)
    block[156:157] = typeflag
    link = draw(st.binary(max_size=100))
    block[157 : 157 + len(link)] = link
    magic = draw(st.sampled_from([b"ustar\x0000", b"ustar  \0", b"\0" * 8]))
    block[257:265] = magic
    prefix = draw(st.binary(max_size=155))
    block[345 : 345 + len(prefix)] = prefix
    return _checksummed(block, draw(st.integers(0, 19)) == 0)


_PAX_KEYS = [b"path", b"linkpath", b"size", b"uid", b"gid", b"mtime", b"atime", b"SCHILY.xattr.user.a",
             b"SCHILY.xattr.trusted.overlay.opaque", b"LIBARCHIVE.xattr.user.%41", b"GNU.sparse.size",
             b"GNU.sparse.map", b"comment", b""]
_PAX_VALUES = [b"", b"0", b"-1", b"5", b"NaN", b"Infinity", b"1e999999999", b"1.5", b"-0.5", b"99999999999999999999999",
               b"1_0", b" 7", b"\xff\xfe", b"a=b", b"x\ny", b"4294967296", b"18446744073709551616", b"+3"]


@st.composite
def _pax_records(draw: st.DrawFn) -> bytes:
    out = b""
    for _ in range(draw(st.integers(0, 4))):
        key = draw(st.sampled_from(_PAX_KEYS) | st.binary(max_size=16))
        value = draw(st.sampled_from(_PAX_VALUES) | st.binary(max_size=40))
        body = b" " + key + b"=" + value + b"\n"
        n = len(pax_record(key, value))  # the length counts its own digits
        length: bytes = b"%d" % n
        fault = draw(st.integers(0, 9))
        if fault == 0:
            length = b"%d" % (n + draw(st.integers(-n, 40)))
        elif fault == 1:
            length = draw(st.sampled_from([b"", b"-5", b"+%d" % n, b"9" * 30, b"0x10", b"%d_" % n]))
        out += length + body
    if draw(st.integers(0, 9)) == 0:
        out += draw(st.binary(max_size=20))
    return out


@st.composite
def _member(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["file", "file", "pax", "global", "longname", "longlink", "other", "sparse"]))
    if kind in ("pax", "global", "longname", "longlink"):
        body = draw(_pax_records()) if kind in ("pax", "global") else draw(st.binary(max_size=700))
        flag = {"pax": b"x", "global": b"g", "longname": b"L", "longlink": b"K"}[kind]
        size: int | bytes = len(body)
    else:
        flag = {"file": b"0", "sparse": b"S"}.get(kind) or draw(st.sampled_from(
            [b"\0", b"1", b"2", b"3", b"4", b"5", b"6", b"7", b"V", b"M", b"Z", b"\xff"]))
        body = draw(st.binary(max_size=1500))
        size = len(body)
    if draw(st.integers(0, 7)) == 0:  # the size field lies, or is base-256, or garbage
        lies: list[int | bytes] = [len(body) + 1, max(len(body) - 1, 0), 2**40, -1, 2**88,
                                   b"\x80" + b"\0" * 10 + b"\x10", b"zz", b"\xff" * 12]
        size = draw(st.sampled_from(lies))
    return draw(_header(flag, size)) + body + bytes(-len(body) % 512)


@st.composite
def _archive(draw: st.DrawFn) -> bytes:
    data = b"".join(draw(st.lists(_member(), max_size=5)))
    data += bytes(draw(st.sampled_from([0, 512, 1024, 1024, 10240])))
    if draw(st.integers(0, 3)) == 0:
        data = data[: draw(st.integers(0, len(data)))]
    if data and draw(st.integers(0, 4)) == 0:
        flip = bytearray(data)
        for _ in range(draw(st.integers(1, 4))):
            flip[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
        data = bytes(flip)
    return data


def _check_entry(e: TarEntry) -> None:
    """What the reader promises of an entry it yields: values the index and the kernel can hold."""
    assert e.type in ("file", "hardlink", "symlink", "char", "block", "dir", "fifo")
    assert e.size >= 0 and (e.size == 0 or e.type == "file")
    assert 0 <= e.mode <= 0o7777
    assert 0 <= e.uid <= _U32_MAX and 0 <= e.gid <= _U32_MAX
    assert 0 <= e.devmajor <= _U32_MAX and 0 <= e.devminor <= _U32_MAX
    assert -(2**63) <= e.mtime_ns // 1_000_000_000 < 2**63
    assert not any(k.startswith(b"GNU.sparse.") for k in e.pax)
    # the layer entry rules on what the reader gave: UnsafeEntry is their one error
    with contextlib.suppress(UnsafeEntry):
        split_path(e.name, "entry", 4096)
    with contextlib.suppress(UnsafeEntry):
        pax_xattrs(e.pax, "entry")


def check_tar(data: bytes, piece: int = 4096, read: int = 1000) -> None:
    """Any bytes as a layer tar: entries that keep the reader's promises and no data past the
    archive, or SourceError (TarError, UnsafeEntry)."""
    pieces = iter([data[i : i + piece] for i in range(0, len(data), piece)])
    tar = TarReader(lambda: next(pieces, b""))
    total = 0
    try:
        for entry in tar:
            _check_entry(entry)
            got = 0
            while chunk := tar.read(read):
                assert len(chunk) <= read
                got += len(chunk)
            if entry.type == "file":
                assert got == entry.size
            total += got
            assert total <= len(data)
        assert tar.ended
    except SourceError:
        pass


@fuzz(1000)
@given(data=_archive(), piece=st.sampled_from([1, 511, 512, 4096, 1 << 20]), read=st.sampled_from([1, 700, 1 << 16]))
def test_tar_archives(data: bytes, piece: int, read: int) -> None:
    check_tar(data, piece, read)


@fuzz(300)
@given(raw=st.binary(max_size=3000))
def test_tar_arbitrary_bytes(raw: bytes) -> None:
    check_tar(raw)


@fuzz(40)
@given(data=_archive(), how=st.sampled_from(["none", "gzip", "zstd", "garbage-gzip", "garbage-zstd"]),
       cut=st.integers(0, 100))
def test_layer_streams(data: bytes, how: str, cut: int) -> None:
    """A layer blob (plain, gzip or zstd; truncated; garbage after a magic) through LayerStream
    into the tar reader: SourceError (DigestMismatch, LimitExceeded) or entries."""
    import gzip

    if how == "gzip":
        blob = gzip.compress(data)
    elif how == "zstd":
        blob = zstandard.ZstdCompressor().compress(data)
    else:
        blob = {"none": b"", "garbage-gzip": b"\x1f\x8b", "garbage-zstd": b"\x28\xb5\x2f\xfd"}[how] + data
    if cut < 30:
        blob = blob[: len(blob) * cut // 30]
    stream = LayerStream(io.BytesIO(blob), name="fuzz", compression=None, digest=oci.sha256_digest(blob),
                         size=len(blob), diff_id=None, max_size=64 * 1024)
    try:
        tar = TarReader(stream.next_piece)
        for entry in tar:
            _check_entry(entry)
            while tar.read(1 << 16):
                pass
        stream.close_and_verify()
    except SourceError:
        pass
    finally:
        stream.abort()


def _pax_member(records: bytes, flag: bytes = b"x") -> bytes:
    block = bytearray(512)
    block[0:9] = b"PaxHeader"
    block[100:108] = b"0000644\0"
    block[124:136] = _num_field(12, len(records))
    block[156:157] = flag
    block[257:265] = b"ustar\x0000"
    return _checksummed(block, False) + records + bytes(-len(records) % 512)




@pytest.mark.parametrize("flag", [b"x", b"g"])
def test_tar_metadata_is_bounded_across_headers(flag: bytes) -> None:
    """Many pax headers, each under the limit, together over it: refused, not accumulated
    (the limit held per header only)."""
    from turbofs.core.config import TAR_MAX_META_SIZE
    from turbofs.core.tar import TarError

    value = b"v" * (1 << 20)
    headers = [_pax_member(pax_record(b"comment%d" % i, value), flag)
               for i in range(TAR_MAX_META_SIZE // len(value) + 2)]
    data = b"".join(headers) + _pax_member(b"", b"0") + bytes(1024)
    pieces = iter([data[i : i + (1 << 20)] for i in range(0, len(data), 1 << 20)])
    with pytest.raises(TarError, match=r"limited|more than"):
        list(TarReader(lambda: next(pieces, b"")))


@pytest.mark.parametrize("path", corpus("tar"))
def test_tar_corpus(path: Path) -> None:
    data = path.read_bytes()
    for piece in (1, 512, 4096):
        check_tar(data, piece)


# -- erofs metadata round trip ------------------------------------------------------------

_ECS = 1 << 12  # erofs round trips use 4 KiB chunks: the smallest the index allows
_XATTR_NAMES = [b"user.a", b"user.long." + b"n" * 40, b"security.capability", b"trusted.x", b"user.b"]


@st.composite
def _tree(draw: st.DrawFn) -> bytes:
    """A random index: directories, files (several chunks, holes, shared chunks), symlinks,
    hardlinks, devices and fifos, xattrs (some shared by several inodes)."""
    n_chunks = draw(st.integers(1, 6))
    ulens = [draw(st.sampled_from([_ECS, _ECS // 2, 1, 3000])) for _ in range(n_chunks)]
    chunks = [fmt.Chunk(i, hashlib.sha256(b"%d" % i).digest(), 0, i * 100, 100, ulens[i]) for i in range(n_chunks)]
    specs: list[dict[str, Any]] = [{"mode": stat.S_IFDIR | 0o755, "children": []}]
    dirs = [0]
    names = st.binary(min_size=1, max_size=draw(st.sampled_from([8, 255]))).map(
        lambda b: b"_" + b if b in (b".", b"..") else b.replace(b"/", b"_").replace(b"\0", b"-"))
    xattrs = st.dictionaries(st.sampled_from(_XATTR_NAMES), st.sampled_from([b"", b"v", b"\xff" * 70]), max_size=3)
    for _ in range(draw(st.integers(0, 14))):
        kind = draw(st.sampled_from(["dir", "file", "file", "symlink", "hardlink", "char", "fifo"]))
        parent = draw(st.sampled_from(dirs))
        name = draw(names)
        if any(n == name for n, _ in specs[parent]["children"]):
            continue
        common = {"uid": draw(st.sampled_from([0, 1000, _U32_MAX])), "gid": draw(st.integers(0, 70000)),
                  "mtime_ns": draw(st.integers(-(2**40), 2**62)), "xattrs": tuple(sorted(draw(xattrs).items()))}
        if kind == "hardlink":
            files = [i for i, s in enumerate(specs) if stat.S_ISREG(s["mode"])]
            if not files:
                continue
            specs[parent]["children"].append((name, draw(st.sampled_from(files))))
            continue
        ino = len(specs)
        if kind == "dir":
            spec = {"mode": stat.S_IFDIR | 0o755, "children": [], **common}
            dirs.append(ino)
        elif kind == "file":
            n = draw(st.integers(0, 3))
            refs = [(draw(st.sampled_from([fmt.HOLE, *range(n_chunks)])), 0) for _ in range(n)]
            size = 0 if n == 0 else (n - 1) * _ECS + draw(st.integers(1, _ECS))
            # each piece must fit its chunk: the last piece's length, the others a whole chunk
            fixed = []
            for k, (cid, off) in enumerate(refs):
                length = min(_ECS, size - k * _ECS)
                fixed.append((cid, off) if cid == fmt.HOLE or length <= ulens[cid] else (fmt.HOLE, 0))
            spec = {"mode": stat.S_IFREG | draw(st.sampled_from([0o644, 0o4755])), "size": size,
                    "refs": tuple(fixed), **common}
        elif kind == "symlink":
            target = draw(st.binary(min_size=1, max_size=300)).replace(b"\0", b"-")
            spec = {"mode": stat.S_IFLNK | 0o777, "target": target, **common}
        elif kind == "char":
            spec = {"mode": stat.S_IFCHR | 0o600, "rdev": (draw(st.integers(0, 4095)), draw(st.integers(0, 2**20 - 1))),
                    **common}
        else:
            spec = {"mode": stat.S_IFIFO | 0o600, **common}
        specs.append(spec)
        specs[parent]["children"].append((name, ino))
    inodes = [fmt.InodeSpec(**{**s, "children": tuple(s.get("children", ()))}) for s in specs]
    return fmt.encode(chunk_size=_ECS, inodes=inodes, chunks=chunks, blobs=[fmt.Blob(b"\1" * 32, 1000)],
                      prefetch=list(range(n_chunks)))


_fsck = shutil.which("fsck.erofs")


def _fsck_accepts(image: ErofsImage, path: Path) -> None:
    with open(path, "wb") as f:
        image.write_to(f, lambda chunk: bytes(chunk.ulen))  # zero data: fsck checks the metadata
    proc = subprocess.run([cast(str, _fsck), str(path)], capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.skipif(_fsck is None, reason="erofs-utils (fsck.erofs) is not installed")
@fuzz(100)
@given(blob=_tree())
def test_erofs_round_trip(blob: bytes, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Random trees -> index -> erofs metadata: the checker passes and fsck.erofs accepts it."""
    idx = fmt.Index.from_bytes(blob)
    idx.verify()
    image = build_erofs(idx)
    check_erofs(image)
    _fsck_accepts(image, tmp_path_factory.mktemp("erofs") / "image.erofs")


def check_mutated_erofs(image: ErofsImage, meta: bytes) -> None:
    """Metadata other than the writer's: check_erofs passes or raises ErofsCorrupt, nothing else."""
    with contextlib.suppress(ErofsCorrupt):
        check_erofs(dataclasses.replace(image, meta=meta))


@fuzz(300)
@given(blob=_tree(), data=st.data())
def test_erofs_mutated_metadata(blob: bytes, data: st.DataObject) -> None:
    image = build_erofs(fmt.Index.from_bytes(blob))
    meta = bytearray(image.meta)
    used = max(image.nids) * 32 + 256  # inodes first: mutate mostly where there is something
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(1024, min(used, len(meta) - 1)) | st.integers(0, len(meta) - 1))
        if data.draw(st.booleans()):
            meta[pos] ^= 1 << data.draw(st.integers(0, 7))
        else:
            value = data.draw(st.sampled_from(_INTERESTING) | st.integers(0, 2**32 - 1))
            meta[pos : pos + 4] = struct.pack("<I", value)[: len(meta) - pos]
    check_mutated_erofs(image, bytes(meta))
    if data.draw(st.integers(0, 9)) == 0:  # metadata of the wrong length
        check_mutated_erofs(image, bytes(meta[: data.draw(st.integers(0, len(meta)))]))


@pytest.mark.parametrize("path", corpus("erofs"))
def test_erofs_corpus(path: Path, tmp_path: Path) -> None:
    """Index blobs kept for the round trip: the ones that decode round trip through fsck."""
    idx = fmt.Index.from_bytes(path.read_bytes())
    image = build_erofs(idx)
    check_erofs(image)
    if _fsck is not None:
        _fsck_accepts(image, tmp_path / "image.erofs")


# -- HTTP Range headers and batch bodies (server.app, server.turbo_ext) --------------------

#: runs past Python's 4300-digit int limit included (tests/fuzz_corpus/range/regress-5000-digits.txt)
_DIGITS = st.text("0123456789", min_size=1, max_size=25) | st.sampled_from(
    ["0", "00", "9" * 25, "\u0663", "1" * 5000, "0" * 5000 + "7", "18446744073709551616"])


@st.composite
def _range_header(draw: st.DrawFn) -> str:
    specs = []
    for _ in range(draw(st.integers(0, 40))):
        first = draw(st.none() | _DIGITS)
        last = draw(st.none() | _DIGITS)
        spec = f"{first or ''}-{last or ''}"
        specs.append(draw(st.sampled_from([spec, spec, spec, f" {spec} ", spec.replace("-", ""), "", "-", "a-b"])))
    unit = draw(st.sampled_from(["bytes", "bytes", "Bytes", " bytes ", "items", ""]))
    return f"{unit}={','.join(specs)}" if draw(st.integers(0, 9)) else draw(st.text(max_size=60))


def check_range_header(value: str, size: int) -> None:
    """None (malformed) or satisfiable ranges inside the blob, each non-empty."""
    ranges = server_app._parse_ranges(value, size)
    if ranges is None:
        return
    for start, end in ranges:
        assert 0 <= start < end <= size


def check_content_range(value: str) -> None:
    request = cast(Any, SimpleNamespace(headers={"Content-Range": value}))
    try:
        got = server_app._content_range(request)
    except DistributionError:
        return
    assert got is not None and 0 <= got[0] <= got[1]


@fuzz(300)
@given(value=_range_header(), size=st.sampled_from([0, 1, 100, 2_500_000]) | st.integers(0, 2**40))
def test_range_headers(value: str, size: int) -> None:
    check_range_header(value, size)
    check_content_range(value.partition("=")[2].split(",")[0])


def _batch_config() -> RegistryConfig:
    return RegistryConfig()


def check_batch_body(raw: bytes, cfg: RegistryConfig) -> bool:
    """A batch body as the server reads it (server.jsonbody, then the ranges): refused with
    JsonError or _Bad (both a 400), or ranges the server may serve. Whether it was taken."""
    try:
        body = jsonbody.loads(raw, "request body")
    except jsonbody.JsonError:
        return False
    try:
        ranges = turbo_ext._parse_ranges(body, cfg)
    except turbo_ext._Bad:
        return False
    assert 0 < len(ranges) <= cfg.max_batch_ranges
    assert sum(length for _, _, length in ranges) <= cfg.max_batch_bytes
    for digest, offset, length in ranges:
        oci.check_digest(digest)
        assert type(offset) is int and type(length) is int and offset >= 0 and length > 0
    return True


_D = "sha256:" + "c" * 64


#: stands for a 5000-digit number in a generated body (json.dumps cannot write one)
_HUGE = "fuzz-5000-digits"


@st.composite
def _batch_body(draw: st.DrawFn) -> bytes:
    def field() -> Any:
        return draw(st.sampled_from([0, 1, 4096, -1, 2**63, _HUGE, 1.5, "1", None, [], {}, True, False])
                    | st.integers(0, 2**40))

    ranges = [{"digest": draw(st.sampled_from([_D, "sha256:x", "", 5, "sha512:" + "d" * 128])),
               "offset": field(), "length": field()} for _ in range(draw(st.integers(0, 6)))]
    if draw(st.integers(0, 9)) == 0:
        ranges = [{"digest": _D, "offset": 0, "length": 1}] * draw(st.sampled_from([1000, 1025, 5000]))
    body: Any = {"ranges": ranges}
    shape = draw(st.integers(0, 9))
    if shape == 0:
        body = draw(_JSON)
    elif shape == 1:
        body = {"ranges": draw(_JSON)}
    elif shape == 2:
        body = ranges
    raw = json.dumps(body).encode().replace(f'"{_HUGE}"'.encode(), b"7" * 5000)
    if draw(st.integers(0, 9)) == 0:
        raw = raw[: draw(st.integers(0, len(raw)))]
    if draw(st.integers(0, 19)) == 0:
        raw = b'{"ranges": ' + b"[" * 5000 + raw + b"]" * 5000 + b"}"
    return raw


@fuzz(200)
@given(raw=_batch_body())
def test_batch_bodies(raw: bytes) -> None:
    check_batch_body(raw, _batch_config())


def _replay_line(path: Path) -> tuple[str, int]:
    """A corpus file of the range folder: the blob size on the first line, the header after."""
    size, _, value = path.read_text().partition("\n")
    return value.rstrip("\n"), int(size)


@pytest.mark.parametrize("path", corpus("range"))
def test_range_corpus(path: Path) -> None:
    value, size = _replay_line(path)
    check_range_header(value, size)
    check_content_range(value.partition("=")[2].split(",")[0])


#: the batch bodies of the corpus the server takes; it refuses every other one with a 400
_BATCH_TAKEN = {"seed-ok.json"}


@pytest.mark.parametrize("path", corpus("batch"))
def test_batch_corpus(path: Path) -> None:
    assert check_batch_body(path.read_bytes(), _batch_config()) == (path.name in _BATCH_TAKEN)


def test_every_corpus_folder_is_replayed() -> None:
    """A corpus folder without a replay test would be kept for nothing; none is left pending
    (a pending input is a crash not fixed yet)."""
    replayed = {"index", "json", "tar", "erofs", "range", "batch"}
    assert {p.name for p in CORPUS.iterdir() if p.is_dir()} <= replayed
    assert all(any((CORPUS / name).iterdir()) for name in replayed)

