"""Sources on real files: folders, SA-1B tars (streamed, hostile members), manifests, fsspec."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import tarfile

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.masks.sam_json import MaskDecodeError, decode_sam_json
from pipeline.sources.decode import ImageDecodeError, decode_image
from pipeline.sources.listing import Shard, list_inputs, list_shards
from pipeline.sources.reading import ImageRecord, iter_shard, iter_source, read_uri
from tests.pipeline.badinputs import (
    add_member,
    add_symlink,
    build_bad_corpus,
    encode,
    gradient_rgb,
    sam_json,
)

JPG = encode(gradient_rgb(8, 12), "JPEG")
PNG = encode(gradient_rgb(8, 12), "PNG")


def h8(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def tree(root) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def make_tar(path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            add_member(tar, name, data)


# ---------------------------------------------------------------------------------------------
# Folders


def test_folder_recursive_sorted_grouped(tmp_path):
    root = tmp_path / "photos"
    (root / "b" / "deep").mkdir(parents=True)
    files = {
        "z.png": PNG,
        "a.JPG": JPG,
        "b/deep/c.tiff": b"tiff?",
        "b/x.webp": b"webp?",
        "b/y.bmp": b"bmp?",
        "m.jpeg": JPG,
        "notes.txt": b"skipped",
        "b/data.json": b"{}",
        "b/anim.gif": b"gif?",
        "zz.png": PNG,
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    listing = list_inputs([str(root)], shard_size=2)
    shards = listing.shards
    # nothing vanishes: the files that are no images are counted, with their paths
    assert listing.skipped == {"not an image": 2}
    assert listing.skipped_examples == {
        "not an image": [f"{root}/b/data.json", f"{root}/notes.txt"]
    }
    ids = [
        "a.JPG",
        "b/anim.gif",
        "b/deep/c.tiff",
        "b/x.webp",
        "b/y.bmp",
        "m.jpeg",
        "z.png",
        "zz.png",
    ]
    prefix = f"photos-{h8(str(root))}"
    assert [s.name for s in shards] == [f"{prefix}-{i:05d}" for i in range(4)]
    assert [[i for i, _ in s.items] for s in shards] == [ids[0:2], ids[2:4], ids[4:6], ids[6:8]]
    assert all(s.kind == "folder" and s.uri == str(root) and s.expected == 2 for s in shards)
    assert shards[0].fingerprint == hashlib.sha256(b"a.JPG\nb/anim.gif").hexdigest()
    assert list_shards(str(root), shard_size=2) == shards  # deterministic
    records = list(iter_source(str(root), shard_size=2))
    assert [r.image_id for r in records] == ids
    assert [r.shard for r in records] == [s.name for s in shards for _ in range(2)]
    assert records[0] == ImageRecord(
        image_id="a.JPG", uri=str(root / "a.JPG"), shard=shards[0].name, data=JPG
    )
    assert all(r.error is None and r.sam_json is None for r in records)


def test_folder_through_fsspec_memory():
    fs = fsspec.filesystem("memory")
    fs.pipe({"/mem-photos/one.png": PNG, "/mem-photos/sub/two.jpg": JPG, "/mem-photos/x.txt": b""})
    (shard,) = list_shards(["memory://mem-photos"])
    assert shard.name == f"mem-photos-{h8('memory://mem-photos')}-00000"
    records = list(iter_shard(shard))
    assert [(r.image_id, r.uri, r.data) for r in records] == [
        ("one.png", "memory:///mem-photos/one.png", PNG),
        ("sub/two.jpg", "memory:///mem-photos/sub/two.jpg", JPG),
    ]


def test_unreadable_folder_file_becomes_error_record(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    (root / "a.png").write_bytes(PNG)
    (root / "b.png").write_bytes(PNG)
    (shard,) = list_shards([str(root)])
    (root / "b.png").unlink()  # gone between listing and reading
    records = list(iter_shard(shard))
    assert [r.image_id for r in records] == ["a.png", "b.png"]
    assert records[0].error is None
    assert records[1].data is None and "cannot read" in records[1].error
    assert "FileNotFoundError" in records[1].error


def test_max_bytes(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    (root / "big.png").write_bytes(PNG)
    (record,) = iter_source(str(root), max_bytes=len(PNG) - 1)
    assert "larger than max_bytes" in record.error
    (record,) = iter_source(str(root), max_bytes=len(PNG))
    assert record.data == PNG


# ---------------------------------------------------------------------------------------------
# SA-1B tars


def test_tar_pairs_and_hostile_members(tmp_path):
    path = tmp_path / "sa_000123.tar"
    js = {k: sam_json(k, 8, 12, [(0, 4, 0, 4)]) for k in range(1, 6)}
    with tarfile.open(path, "w") as tar:
        add_member(tar, "./sa_1.jpg", JPG)
        add_member(tar, "sa_1.json", js[1])
        add_member(tar, "sa_2.json", js[2])  # json before its image
        add_member(tar, "sa_2.jpg", JPG)
        add_member(tar, "sa_3.jpg", JPG)  # never gets a json
        add_member(tar, "sa_4.json", js[4])  # never gets an image
        add_member(tar, "../up.jpg", JPG)
        add_member(tar, "a/../../up2.jpg", JPG)
        add_member(tar, "/etc/abs.jpg", JPG)
        add_member(tar, "../evil.json", js[5])
        add_symlink(tar, "sa_5.jpg", "/etc/passwd")
        add_member(tar, "sa_1.jpg", JPG)  # duplicate name
        add_member(tar, "sub/sa_6.png", PNG)
        add_member(tar, "README.md", b"skipped")
        tar.addfile(tarfile.TarInfo("somedir/"))
    before = tree(tmp_path)
    (shard,) = list_shards([str(path)])
    assert shard == Shard(name=f"sa_000123-{h8(str(path))}", kind="tar", uri=str(path))
    assert shard.expected is None and shard.fingerprint == ""
    records = list(iter_shard(shard))
    got = [(r.image_id, r.error) for r in records]
    assert [i for i, _ in got] == [
        "sa_1",
        "sa_2",
        "../up.jpg",
        "a/../../up2.jpg",
        "/etc/abs.jpg",
        "../evil.json",
        "sa_1#12",
        # halves still waiting for their partner, in arrival order, at the end of the archive
        "sa_3",
        "sa_4",
        "sa_5",
        "sub/sa_6",
    ]
    by_id = {r.image_id: r for r in records}
    assert by_id["sa_1"].data == JPG and by_id["sa_1"].sam_json == js[1]
    assert by_id["sa_1"].uri == f"tar://{path}#./sa_1.jpg"
    assert by_id["sa_2"].sam_json == js[2] and by_id["sa_2"].uri == f"tar://{path}#sa_2.jpg"
    assert by_id["sa_3"].data == JPG and by_id["sa_3"].sam_json is None and not by_id["sa_3"].error
    assert by_id["sub/sa_6"].data == PNG
    assert "has no image" in by_id["sa_4"].error
    for bad in ("../up.jpg", "a/../../up2.jpg", "/etc/abs.jpg", "../evil.json"):
        assert "escapes the archive" in by_id[bad].error and by_id[bad].data is None
    assert "not a regular file" in by_id["sa_5"].error
    assert "duplicate tar member" in by_id["sa_1#12"].error
    assert {r.shard for r in records} == {shard.name}
    assert read_uri(by_id["sa_2"].uri) == JPG
    with pytest.raises(ValueError, match="escapes the archive"):
        read_uri(by_id["../up.jpg"].uri)
    assert tree(tmp_path) == before  # nothing extracted anywhere
    assert not os.path.exists("/etc/abs.jpg")


def test_truncated_tar_inside_member_data(tmp_path):
    buf = io.BytesIO()
    big = encode(gradient_rgb(96, 96, seed=2), "PNG")
    with tarfile.open(fileobj=buf, mode="w") as tar:
        add_member(tar, "sa_1.jpg", JPG)
        add_member(tar, "sa_1.json", sam_json(1, 8, 12, []))
        add_member(tar, "sa_2.jpg", JPG)  # its json is the cut member
        cut = tar.offset + 512 + 100
        add_member(tar, "sa_2.json", big)
        add_member(tar, "sa_3.jpg", JPG)
    path = tmp_path / "cut.tar"
    path.write_bytes(buf.getvalue()[:cut])
    records = list(iter_source(str(path)))
    assert [r.image_id for r in records] == ["sa_1", "sa_2"]
    assert records[0].error is None and records[0].data == JPG
    assert records[1].data is None
    assert records[1].error.startswith("its mask json: truncated tar: member 'sa_2.json' cut off")


def test_truncated_tar_in_header_and_at_member_boundary(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        add_member(tar, "sa_1.jpg", JPG)
        boundary = tar.offset
        add_member(tar, "sa_2.jpg", JPG)
    raw = buf.getvalue()
    for name, size, reason in [
        ("header.tar", boundary + 200, "no end-of-archive marker after 1 members"),
        ("boundary.tar", boundary, "no end-of-archive marker after 1 members"),
    ]:
        (tmp_path / name).write_bytes(raw[:size])
        records = list(iter_source(str(tmp_path / name)))
        (shard,) = list_shards([str(tmp_path / name)])
        assert [r.image_id for r in records] == ["sa_1", f"{shard.name}#truncated"], name
        assert records[0].data == JPG
        assert records[1].error == f"truncated tar: {reason}"
        assert records[1].uri == str(tmp_path / name)
    (tmp_path / "complete.tar").write_bytes(raw)
    assert [r.image_id for r in iter_source(str(tmp_path / "complete.tar"))] == ["sa_1", "sa_2"]


def test_gzipped_tar_streamed_and_truncated(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        add_member(tar, "sa_1.jpg", JPG)
        add_member(tar, "sa_1.json", b"{}")
        add_member(tar, "sa_2.jpg", encode(gradient_rgb(64, 64, seed=5), "PNG"))
    packed = gzip.compress(buf.getvalue())
    (tmp_path / "s.tar.gz").write_bytes(packed)
    (shard,) = list_shards([str(tmp_path / "s.tar.gz")])
    assert shard.name.startswith("s-")  # ".tar.gz" stripped
    assert [(r.image_id, r.error) for r in iter_shard(shard)] == [("sa_1", None), ("sa_2", None)]
    (tmp_path / "cut.tgz").write_bytes(packed[: len(packed) // 2])
    records = list(iter_source(str(tmp_path / "cut.tgz")))
    assert records[0].image_id == "sa_1" and records[0].error is None
    assert len(records) == 2 and "truncated" in records[1].error


@pytest.mark.parametrize("content", [b"", b"this is not a tar archive at all" * 40])
def test_unreadable_tar_gives_one_error_record(tmp_path, content):
    path = tmp_path / "sa_9.tar"
    path.write_bytes(content)
    records = list(iter_source(str(path)))
    (shard,) = list_shards([str(path)])
    assert len(records) == 1
    assert records[0].image_id == f"{shard.name}#unreadable"
    assert "not a readable tar archive" in records[0].error


def test_large_member_skipped_stream_goes_on(tmp_path):
    path = tmp_path / "t.tar"
    big = encode(gradient_rgb(64, 64), "PNG")
    make_tar(path, [("a.png", big), ("b.jpg", JPG)])
    records = list(iter_source(str(path), max_bytes=len(big) - 1))
    assert [(r.image_id, r.data) for r in records] == [("a", None), ("b", JPG)]
    assert "exceeds max_bytes" in records[0].error


def test_folder_with_tars_and_images(tmp_path):
    root = tmp_path / "mixed"
    (root / "shards").mkdir(parents=True)
    make_tar(root / "shards" / "sa_000007.tar", [("sa_1.jpg", JPG)])
    (root / "loose.png").write_bytes(PNG)
    tar_shard, folder_shard = list_shards([f"{root}/"])  # trailing slash ignored
    assert tar_shard == Shard(
        name=f"sa_000007-{h8(f'{root}/shards/sa_000007.tar')}",
        kind="tar",
        uri=str(root / "shards" / "sa_000007.tar"),
    )
    assert folder_shard.items == (("loose.png", str(root / "loose.png")),)
    assert [r.image_id for r in iter_shard(tar_shard)] == ["sa_1"]
    assert read_uri(str(root / "loose.png")) == PNG


def test_tar_through_fsspec_memory_and_glob(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        add_member(tar, "sa_1.jpg", JPG)
    for k in (0, 1):
        with fsspec.open(f"memory://bucket/sa1b/sa_00000{k}.tar", "wb") as f:
            f.write(buf.getvalue())
    shards = list_shards(["memory://bucket/sa1b/sa_*.tar"])
    assert [s.name for s in shards] == [
        f"sa_000000-{h8('memory://bucket/sa1b/sa_000000.tar')}",
        f"sa_000001-{h8('memory://bucket/sa1b/sa_000001.tar')}",
    ]
    assert shards == list_shards(["memory://bucket/sa1b"])  # a folder of tars: same shards
    (record,) = iter_shard(shards[1])
    assert record.uri == "tar://memory:///bucket/sa1b/sa_000001.tar#sa_1.jpg"
    assert read_uri(record.uri) == JPG
    with pytest.raises(FileNotFoundError):
        read_uri("tar://memory:///bucket/sa1b/sa_000001.tar#nope.jpg")


# ---------------------------------------------------------------------------------------------
# Manifests


def test_csv_manifest_with_ids_and_relative_uris(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(PNG)
    fsspec.filesystem("memory").pipe("/manifest-src/b.jpg", JPG)
    manifest = tmp_path / "list.csv"
    manifest.write_text(
        f"uri,image_id\nimgs/a.png,first\nmemory://manifest-src/b.jpg,second\n"
        f"{tmp_path}/imgs/missing.png,third\n"
    )
    shards = list_shards([str(manifest)], shard_size=2)
    prefix = f"list-{h8(str(manifest))}"
    assert [s.name for s in shards] == [f"{prefix}-00000", f"{prefix}-00001"]
    assert shards[0].items == (
        ("first", str(tmp_path / "imgs" / "a.png")),
        ("second", "memory://manifest-src/b.jpg"),
    )
    records = [r for s in shards for r in iter_shard(s)]
    assert [(r.image_id, r.data) for r in records] == [
        ("first", PNG),
        ("second", JPG),
        ("third", None),
    ]
    assert "cannot read" in records[2].error


def test_parquet_manifest_hashes_uris_without_ids(tmp_path):
    (tmp_path / "a.png").write_bytes(PNG)
    uri = str(tmp_path / "a.png")
    pq.write_table(pa.table({"uri": [uri, None]}), tmp_path / "m.parquet")
    (shard,) = list_shards([str(tmp_path / "m.parquet")])
    records = list(iter_shard(shard))
    assert records[0].image_id == hashlib.sha256(uri.encode()).hexdigest()[:16]
    assert records[0].data == PNG
    assert (records[1].image_id, records[1].error) == ("row-1", "empty uri")


def test_manifest_without_uri_column(tmp_path):
    (tmp_path / "m.csv").write_text("path\na.png\n")
    with pytest.raises(ValueError, match="no 'uri' column"):
        list_shards([str(tmp_path / "m.csv")])


# ---------------------------------------------------------------------------------------------
# Listing errors, pickling


def test_list_shards_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="input not found"):
        list_shards([str(tmp_path / "nothing")])
    with pytest.raises(FileNotFoundError, match="no file matches"):
        list_shards([str(tmp_path / "*.tar")])
    (tmp_path / "x.doc").write_bytes(b"?")
    with pytest.raises(ValueError, match="unsupported input"):
        list_shards([str(tmp_path / "x.doc")])
    make_tar(tmp_path / "a.tar", [("a.jpg", JPG)])
    with pytest.raises(ValueError, match="duplicate shards"):
        list_shards([str(tmp_path / "a.tar"), str(tmp_path / "a.tar")])
    with pytest.raises(ValueError, match="shard_size"):
        list_shards([str(tmp_path / "a.tar")], shard_size=0)


def test_records_and_shards_pickle(tmp_path):
    make_tar(tmp_path / "a.tar", [("a.jpg", JPG), ("a.json", b"{}")])
    (shard,) = list_shards([str(tmp_path / "a.tar")])
    (record,) = iter_shard(shard)
    assert pickle.loads(pickle.dumps(shard)) == shard
    assert pickle.loads(pickle.dumps(record)) == record
    assert ImageRecord(**record.to_dict()) == record


# ---------------------------------------------------------------------------------------------
# The bad-input corpus end to end (sources + decoding, as the labeler will run them)


def test_bad_corpus_every_record_as_expected(tmp_path):
    corpus = build_bad_corpus(tmp_path / "corpus")
    before = tree(tmp_path)
    listing = list_inputs(corpus.inputs, shard_size=4)
    shards = listing.shards
    assert listing.skipped == corpus.skipped
    assert [s.kind for s in shards].count("tar") == 2
    outcomes = {}
    for shard in shards:
        for record in iter_shard(shard):
            assert record.image_id not in outcomes, record.image_id  # one record per image
            outcomes[record.image_id] = _outcome(record)
    assert len(outcomes) == len(corpus.expected)
    for e in corpus.expected:
        status, stage, reason, size, n_masks = outcomes[e.image_id]
        assert (status, stage) == (e.status, e.stage), (e, reason)
        assert e.reason in reason.lower(), (e, reason)
        if e.status == "ok":
            assert size == e.size and n_masks == e.sam_masks, e
    assert not corpus.outside.exists()
    assert tree(tmp_path) == before


def _outcome(record: ImageRecord):
    """(status, stage, reason, (h, w), number of SAM masks) as the labeler will see it."""
    if record.error is not None:
        return "error", "source", record.error, None, None
    try:
        image = decode_image(record.data)
    except ImageDecodeError as e:
        return "error", "decode", e.reason, None, None
    height, width = image.shape[:2]
    n_masks = None
    if record.sam_json is not None:
        try:
            n_masks = len(decode_sam_json(record.sam_json, width, height))
        except MaskDecodeError as e:
            return "error", "masks", e.reason, None, None
    return "ok", "", "", (height, width), n_masks
