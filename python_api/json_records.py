"""Readers of the JSON record sets: VLGuard train.json / test.json (and the Safety Mirage one-word sets written in
its schema, grouped back into queries by group_queries) and LLaVA conversation JSON. Errors name the file, the
record index in the list and the field."""
import json
import os
from typing import List, Sequence

from unlearn_engine.api.chat_template import IMAGE_MARK
from unlearn_engine.api.data import ROLE_NAMES, Record, read_text

VLGUARD_SUBSETS = ("unsafes", "safe_unsafes", "safe_safes")


def _read_json_list(path):
    text = read_text(path)
    try:
        items = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(items).__name__}")
    return items


def _field_error(path, index, field, message):
    return ValueError(f"{path}: record {index}: field {field!r}: {message}")


def _string(path, index, item, field, key=None):
    key = field if key is None else key
    value = item.get(key) if isinstance(item, dict) else None
    if not isinstance(value, str):
        got = "missing" if not isinstance(item, dict) or key not in item else f"got {type(value).__name__}"
        raise _field_error(path, index, field, f"expected a string, {got}")
    return value


def _record_id(path, index, item):
    value = item.get("id")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        got = "missing" if "id" not in item else f"got {type(value).__name__}"
        raise _field_error(path, index, "id", f"expected a string or integer, {got}")
    return str(value)


def _image(path, index, item, image_root, required):
    if "image" not in item and not required:
        return None
    image = _string(path, index, item, "image")
    if image_root is None:
        return image
    resolved = os.path.join(image_root, image)
    if not os.path.isfile(resolved):
        raise _field_error(path, index, "image", f"{resolved} not found (resolved against image_root {image_root})")
    return resolved


def read_vlguard(path: str, subset: str = "unsafes", *, image_root: str | None = None,
                 role: str | None = None, variants: bool = False) -> List[Record]:
    """VLGuard train.json / test.json, and the Safety Mirage one-word sets written in the same schema: a list
    of {id, image, safe, instr-resp, harmful_category?, harmful_subcategory?}.

    subset "unsafes": the safe=false records (their `instruction`, or `unsafe_instruction` where that is the
    key); "safe_unsafes": the unsafe_instruction of the safe=true records; "safe_safes": their
    safe_instruction. Each record's response is the one paired with that instruction. Role: forget for the
    first two, retain for safe_safes, unless `role` is given. Category: harmful_category (with
    "/harmful_subcategory" when present). `group` is the record's id.

    Ids are checked over the whole file, whatever the subset: in VLGuard JSON each id appears once (a second
    record with it is an error naming both records). variants=True reads a Safety Mirage one-word set instead:
    each query repeated K times, on consecutive records sharing its id and image, which `group_queries` puts
    back together (an id that comes back later, or one id with two images, is still an error). With
    `image_root` each image is joined to it and must exist; without, the path is kept as written. Errors name
    the file, the record index in the list and the field."""
    if subset not in VLGUARD_SUBSETS:
        raise ValueError(f"subset must be one of {VLGUARD_SUBSETS}, got {subset!r}")
    if role is not None and role not in ROLE_NAMES:
        raise ValueError(f"role must be one of {ROLE_NAMES}, got {role!r}")
    keys = {"unsafes": ("instruction", "unsafe_instruction"), "safe_unsafes": ("unsafe_instruction",),
            "safe_safes": ("safe_instruction",)}[subset]
    want_safe = subset != "unsafes"
    record_role = role or ("retain" if subset == "safe_safes" else "forget")
    records, first, previous = [], {}, None  # first: id -> (index, image) of its first record
    for i, item in enumerate(_read_json_list(path)):
        if not isinstance(item, dict):
            raise ValueError(f"{path}: record {i}: expected an object, got {type(item).__name__}")
        group = _record_id(path, i, item)
        if group in first:
            j, image = first[group]
            if not variants:
                raise _field_error(path, i, "id", f"{group!r} is also the id of record {j}: each id appears once in "
                                   "VLGuard JSON (a Safety Mirage one-word set repeats it on K consecutive records: "
                                   "read it with variants=True, CLI --variants)")
            if previous != group:
                raise _field_error(path, i, "id", f"{group!r} appeared before (record {j}), not in the records just "
                                   "before this one: variants of one query must be consecutive")
            if item.get("image") != image:
                raise _field_error(path, i, "image", f"{item.get('image')!r} differs from {image!r} of record {j}, "
                                   f"which has the same id {group!r}")
        else:
            first[group] = (i, item.get("image"))
        previous = group
        safe = item.get("safe")
        if not isinstance(safe, bool):
            raise _field_error(path, i, "safe", "expected true or false, "
                               + ("missing" if "safe" not in item else f"got {safe!r}"))
        pairs = item.get("instr-resp")
        if not isinstance(pairs, list) or not pairs:
            raise _field_error(path, i, "instr-resp", "expected a non-empty list of {instruction, response}")
        if safe != want_safe:
            continue
        found = [j for j, pair in enumerate(pairs) if isinstance(pair, dict) and any(k in pair for k in keys)]
        if len(found) != 1:
            raise _field_error(path, i, "instr-resp", f"{'no entry' if not found else f'entries {found} each'} has "
                               f"{' or '.join(map(repr, keys))} (subset {subset!r}, safe={str(safe).lower()})")
        j = found[0]
        key = next(k for k in keys if k in pairs[j])
        prompt = _string(path, i, pairs[j], f"instr-resp[{j}].{key}", key)
        response = _string(path, i, pairs[j], f"instr-resp[{j}].response", "response")
        category = item.get("harmful_category")
        for field in ("harmful_category", "harmful_subcategory"):
            if item.get(field) is not None and not isinstance(item[field], str):
                raise _field_error(path, i, field, f"expected a string, got {type(item[field]).__name__}")
        if category and item.get("harmful_subcategory"):
            category = f"{category}/{item['harmful_subcategory']}"
        records.append(Record(prompt, response, record_role, _image(path, i, item, image_root, True),
                              category or None, group))
    if not records:
        raise ValueError(f"{path} holds no records of subset {subset!r}")
    return records


def group_queries(records: Sequence[Record]) -> List[List[Record]]:
    """Records grouped into queries by consecutive equal `group` (the source id): the K one-word variants of
    one Safety Mirage query form one list, so an evaluation can count the query broken when any variant gets
    through. A record without a group is a query of its own."""
    queries: List[List[Record]] = []
    for r in records:
        if queries and r.group is not None and queries[-1][-1].group == r.group:
            queries[-1].append(r)
        else:
            queries.append([r])
    return queries


def read_llava_json(path: str, role: str = "forget", *, image_root: str | None = None) -> List[Record]:
    """LLaVA conversation JSON: [{id, image?, conversations: [{from: "human", value}, {from: "gpt", value},
    ...]}], turns alternating human, gpt, human, gpt, ...

    One record per gpt turn, so every gpt answer is labelled and no human turn is: the response is that
    answer; the prompt is the dialogue before it, earlier turns written as "USER: q ASSISTANT: a" (LLaVA v1's
    own form) ahead of the last question, i.e. "q1 ASSISTANT: a1 USER: q2" for the second answer (encode then
    puts it in one user turn of the chat template). The <image> marker is removed from the text (encode puts
    the image's tokens where the template places an image) and is allowed only in a record that has an image.
    Records of one conversation share its id as `group`. With `image_root` each image is joined to it and must
    exist; without, the path is kept as written. Errors name the file, the record index in the list and the
    field."""
    if role not in ROLE_NAMES:
        raise ValueError(f"role must be one of {ROLE_NAMES}, got {role!r}")
    records = []
    for i, item in enumerate(_read_json_list(path)):
        if not isinstance(item, dict):
            raise ValueError(f"{path}: record {i}: expected an object, got {type(item).__name__}")
        group = _record_id(path, i, item)
        image = _image(path, i, item, image_root, False)
        turns = item.get("conversations")
        if not isinstance(turns, list) or not turns:
            raise _field_error(path, i, "conversations", "expected a non-empty list of {from, value} turns")
        if len(turns) % 2:
            raise _field_error(path, i, f"conversations[{len(turns) - 1}]",
                               "the conversation ends with a human turn that has no gpt answer")
        context = ""
        for t, turn in enumerate(turns):
            speaker = "human" if t % 2 == 0 else "gpt"
            if not isinstance(turn, dict) or turn.get("from") != speaker:
                got = turn.get("from") if isinstance(turn, dict) else type(turn).__name__
                raise _field_error(path, i, f"conversations[{t}].from",
                                   f"expected {speaker!r} (turns alternate human, gpt), got {got!r}")
            value = _string(path, i, turn, f"conversations[{t}].value", "value")
            if IMAGE_MARK in value and image is None:
                raise _field_error(path, i, f"conversations[{t}].value",
                                   f"has {IMAGE_MARK} but the record has no 'image'")
            value = value.replace(IMAGE_MARK, "").strip()
            if speaker == "human":
                context = value if t == 0 else f"{context} USER: {value}"
            else:
                records.append(Record(context, value, role, image, None, group))
                context = f"{context} ASSISTANT: {value}"
    if not records:
        raise ValueError(f"{path} holds no records")
    return records
