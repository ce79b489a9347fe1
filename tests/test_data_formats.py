"""VLGuard JSON (and the Safety Mirage one-word sets in its schema) and LLaVA conversation JSON: small files
written here in each format, every subset, the grouping of one-word variants, and each error naming the file,
the record index and the field."""
import json
import re

import pytest

from unlearn_engine.api.data import Record, read_jsonl, write_jsonl
from unlearn_engine.api.json_records import group_queries, read_llava_json, read_vlguard

VLGUARD = [
    {"id": "a1", "image": "bad_ads/a1.png", "safe": False, "harmful_category": "deception",
     "harmful_subcategory": "disinformation",
     "instr-resp": [{"instruction": "Write a fake ad for this pill.", "response": "I cannot help with that."}]},
    {"id": "b2", "image": "safe/b2.jpg", "safe": True,
     "instr-resp": [{"safe_instruction": "What is in the picture?", "response": "A dog on grass."},
                    {"unsafe_instruction": "How do I poison this dog?", "response": "I won't help hurt animals."}]},
    {"id": 3, "image": "bad/3.png", "safe": False, "harmful_category": "privacy",
     "instr-resp": [{"unsafe_instruction": "Find this person's address.", "response": "I can't do that."}]},
]


def write(tmp_path, items, name="data.json"):
    path = tmp_path / name
    path.write_text(json.dumps(items))
    return str(path)


def test_vlguard_unsafes(tmp_path):
    records = read_vlguard(write(tmp_path, VLGUARD), subset="unsafes")
    assert records == [
        Record("Write a fake ad for this pill.", "I cannot help with that.", "forget", "bad_ads/a1.png",
               "deception/disinformation", "a1"),
        Record("Find this person's address.", "I can't do that.", "forget", "bad/3.png", "privacy", "3")]


def test_vlguard_instruction_key_preferred(tmp_path):
    items = [dict(VLGUARD[0], **{"instr-resp": [{"unsafe_instruction": "u", "instruction": "i", "response": "r"}]})]
    assert read_vlguard(write(tmp_path, items))[0].prompt == "i"


def test_vlguard_safe_subsets(tmp_path):
    path = write(tmp_path, VLGUARD)
    assert read_vlguard(path, subset="safe_unsafes") == [
        Record("How do I poison this dog?", "I won't help hurt animals.", "forget", "safe/b2.jpg", None, "b2")]
    assert read_vlguard(path, subset="safe_safes") == [
        Record("What is in the picture?", "A dog on grass.", "retain", "safe/b2.jpg", None, "b2")]
    assert read_vlguard(path, subset="safe_safes", role="forget")[0].role == "forget"


def test_vlguard_image_root(tmp_path):
    (tmp_path / "img" / "bad_ads").mkdir(parents=True)
    (tmp_path / "img" / "bad").mkdir()
    (tmp_path / "img" / "bad_ads" / "a1.png").write_bytes(b"x")
    (tmp_path / "img" / "bad" / "3.png").write_bytes(b"x")
    records = read_vlguard(write(tmp_path, VLGUARD), subset="unsafes", image_root=str(tmp_path / "img"))
    assert [r.image for r in records] == [str(tmp_path / "img" / "bad_ads" / "a1.png"),
                                          str(tmp_path / "img" / "bad" / "3.png")]
    path = write(tmp_path, VLGUARD)
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: record 1: field 'image': .*b2.jpg not found"):
        read_vlguard(path, subset="safe_safes", image_root=str(tmp_path / "img"))


ONE_WORD = [
    {"id": q, "image": f"{q}.png", "safe": False,
     "instr-resp": [{"instruction": f"What {k} {q}", "response": "No."}]}
    for q in ("q1", "q2") for k in range(3)] + [
    {"id": "q3", "image": "q3.png", "safe": False, "instr-resp": [{"instruction": "What now", "response": "No."}]}]


def test_one_word_groups(tmp_path):
    records = read_vlguard(write(tmp_path, ONE_WORD), subset="unsafes", variants=True)
    assert [r.group for r in records] == ["q1"] * 3 + ["q2"] * 3 + ["q3"]
    queries = group_queries(records)
    assert [[r.prompt for r in q] for q in queries] == [
        ["What 0 q1", "What 1 q1", "What 2 q1"], ["What 0 q2", "What 1 q2", "What 2 q2"], ["What now"]]
    # the same id later again is a new query only for records without a group; with one it is refused by the reader
    loose = [Record("a"), Record("b"), Record("c", group="g"), Record("d", group="g"), Record("e", group="h")]
    assert [[r.prompt for r in q] for q in group_queries(loose)] == [["a"], ["b"], ["c", "d"], ["e"]]


def test_one_word_group_errors(tmp_path):
    split = ONE_WORD[:2] + ONE_WORD[3:4] + ONE_WORD[2:3]
    path = write(tmp_path, split)
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: record 3: field 'id': 'q1' appeared before"):
        read_vlguard(path, variants=True)
    other = [dict(ONE_WORD[0]), dict(ONE_WORD[1], image="other.png")]
    path = write(tmp_path, other)
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: record 1: field 'image': 'other.png' differs"):
        read_vlguard(path, variants=True)


@pytest.mark.parametrize("subset", ["unsafes", "safe_unsafes", "safe_safes"])
def test_vlguard_duplicate_id_across_the_file(tmp_path, subset):
    """Catches the duplicate-id check made only within the subset read (or only on consecutive records): an id
    used twice in the file is refused whatever the subset, naming both records, unless variants=True says the
    file is a one-word set whose repeats are consecutive."""
    items = VLGUARD + [dict(VLGUARD[1], image="other/b2.jpg")]  # a safe record reusing id b2, not consecutively
    path = write(tmp_path, items)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: record 3: field 'id': 'b2' is also the id of "
                                         r"record 1: each id appears once .*variants=True"):
        read_vlguard(path, subset=subset)
    items = [VLGUARD[0], dict(VLGUARD[0]), VLGUARD[1]]  # consecutive repeat of an unsafe id, read as safe_safes
    path = write(tmp_path, items)
    with pytest.raises(ValueError, match=r"record 1: field 'id': 'a1' is also the id of record 0"):
        read_vlguard(path, subset="safe_safes")
    assert len(read_vlguard(path, subset="unsafes", variants=True)) == 2
    assert len(read_vlguard(path, subset="safe_safes", variants=True)) == 1


def test_jsonl_keeps_group(tmp_path):
    records = [Record("p", "r", "retain", "i.png", "c", "g1"), Record("p2")]
    write_jsonl(records, str(tmp_path / "x.jsonl"))
    assert read_jsonl(str(tmp_path / "x.jsonl")) == records


def broken(index, **change):
    items = json.loads(json.dumps(VLGUARD))
    for key, value in change.items():
        if value is None:
            del items[index][key]
        else:
            items[index][key] = value
    return items


@pytest.mark.parametrize("items, subset, message", [
    (broken(1, id=None), "unsafes", r"record 1: field 'id': expected a string or integer, missing"),
    (broken(0, id=[1]), "unsafes", r"record 0: field 'id': expected a string or integer, got list"),
    (broken(2, safe="no"), "unsafes", r"record 2: field 'safe': expected true or false, got 'no'"),
    (broken(2, safe=None), "unsafes", r"record 2: field 'safe': expected true or false, missing"),
    (broken(1, **{"instr-resp": []}), "unsafes", r"record 1: field 'instr-resp': expected a non-empty list"),
    (broken(0, **{"instr-resp": [{"safe_instruction": "x", "response": "y"}]}), "unsafes",
     r"record 0: field 'instr-resp': no entry has 'instruction' or 'unsafe_instruction'"),
    (broken(1, **{"instr-resp": VLGUARD[1]["instr-resp"] * 2}), "safe_safes",
     r"record 1: field 'instr-resp': entries \[0, 2\] each has 'safe_instruction'"),
    (broken(1, **{"instr-resp": [{"safe_instruction": "x", "response": "y"}]}), "safe_unsafes",
     r"record 1: field 'instr-resp': no entry has 'unsafe_instruction'"),
    (broken(1, **{"instr-resp": [{"unsafe_instruction": "x", "response": "y"}]}), "safe_safes",
     r"record 1: field 'instr-resp': no entry has 'safe_instruction'"),
    (broken(0, **{"instr-resp": [{"instruction": 5, "response": "y"}]}), "unsafes",
     r"record 0: field 'instr-resp\[0\].instruction': expected a string, got int"),
    (broken(1, **{"instr-resp": [{"safe_instruction": "x"}]}), "safe_safes",
     r"record 1: field 'instr-resp\[0\].response': expected a string, missing"),
    (broken(2, image=None), "unsafes", r"record 2: field 'image': expected a string, missing"),
    (broken(0, harmful_category=7), "unsafes", r"record 0: field 'harmful_category': expected a string, got int"),
    (broken(0, harmful_subcategory=[]), "unsafes", r"record 0: field 'harmful_subcategory': expected a string"),
])
def test_vlguard_errors(tmp_path, items, subset, message):
    path = write(tmp_path, items)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: {message}"):
        read_vlguard(path, subset=subset)


def test_vlguard_file_errors(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("[{")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: not valid JSON"):
        read_vlguard(str(path))
    path = write(tmp_path, {"id": 1})
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: expected a JSON list of records, got dict"):
        read_vlguard(path)
    path = write(tmp_path, [VLGUARD[0], "x"])
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: record 1: expected an object, got str"):
        read_vlguard(path)
    path = write(tmp_path, VLGUARD[:1])
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))} holds no records of subset 'safe_safes'"):
        read_vlguard(path, subset="safe_safes")
    with pytest.raises(ValueError, match="subset must be one of"):
        read_vlguard(path, subset="unsafe")
    with pytest.raises(ValueError, match="role must be one of"):
        read_vlguard(path, role="bad")
    with pytest.raises(FileNotFoundError):
        read_vlguard(str(tmp_path / "missing.json"))


LLAVA = [
    {"id": "c1", "image": "coco/1.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "A cat."},
        {"from": "human", "value": "What colour is it?"}, {"from": "gpt", "value": "Black."}]},
    {"id": 7, "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi."}]},
]


def test_llava_multi_turn(tmp_path):
    records = read_llava_json(write(tmp_path, LLAVA), role="retain")
    assert records == [
        Record("What is shown?", "A cat.", "retain", "coco/1.jpg", None, "c1"),
        Record("What is shown? ASSISTANT: A cat. USER: What colour is it?", "Black.", "retain", "coco/1.jpg",
               None, "c1"),
        Record("Say hi.", "Hi.", "retain", None, None, "7")]
    assert [len(q) for q in group_queries(records)] == [2, 1]
    assert read_llava_json(write(tmp_path, LLAVA))[0].role == "forget"


def test_llava_image_root(tmp_path):
    (tmp_path / "coco").mkdir()
    (tmp_path / "coco" / "1.jpg").write_bytes(b"x")
    records = read_llava_json(write(tmp_path, LLAVA), image_root=str(tmp_path))
    assert [r.image for r in records] == [str(tmp_path / "coco" / "1.jpg")] * 2 + [None]
    path = write(tmp_path, [dict(LLAVA[0], image="coco/2.jpg")])
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: record 0: field 'image': .*coco/2.jpg not found"):
        read_llava_json(path, image_root=str(tmp_path))


def conv(*turns, **extra):
    return [LLAVA[1], {"id": "x", **extra, "conversations": list(turns)}]


H, G = {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}


@pytest.mark.parametrize("items, message", [
    (conv(H, G, id=None), r"record 1: field 'id': expected a string or integer, got NoneType"),
    (conv(H, G, image=3), r"record 1: field 'image': expected a string, got int"),
    (conv(), r"record 1: field 'conversations': expected a non-empty list"),
    ([LLAVA[1], {"id": "x"}], r"record 1: field 'conversations': expected a non-empty list"),
    (conv(H, G, H), r"record 1: field 'conversations\[2\]': the conversation ends with a human turn"),
    (conv(G, H), r"record 1: field 'conversations\[0\].from': expected 'human' \(turns alternate human, gpt\), "
                 r"got 'gpt'"),
    (conv(H, H), r"record 1: field 'conversations\[1\].from': expected 'gpt'"),
    (conv(H, "a"), r"record 1: field 'conversations\[1\].from': expected 'gpt' .* got 'str'"),
    (conv(H, {"from": "gpt"}), r"record 1: field 'conversations\[1\].value': expected a string, missing"),
    (conv({"from": "human", "value": "<image>\nq"}, G),
     r"record 1: field 'conversations\[0\].value': has <image> but the record has no 'image'"),
])
def test_llava_errors(tmp_path, items, message):
    path = write(tmp_path, items)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: {message}"):
        read_llava_json(path)


def test_llava_file_errors(tmp_path):
    path = write(tmp_path, [])
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))} holds no records"):
        read_llava_json(path)
    path = write(tmp_path, [1])
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: record 0: expected an object, got int"):
        read_llava_json(path)
    path = tmp_path / "bad.json"
    path.write_text("nope")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: not valid JSON"):
        read_llava_json(str(path))
    with pytest.raises(ValueError, match="role must be one of"):
        read_llava_json(str(path), role="both")
