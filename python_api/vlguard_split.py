"""The `vlguard-split` command: VLGuard train.json and the harmful responses to forget.jsonl / retain.jsonl, as
the Safety Mirage pipeline splits them; every input is checked before anything is written."""
import dataclasses
import json
import os

from unlearn_engine.api.data import check_input_file, read_text, write_jsonl
from unlearn_engine.api.evaluation.report import markdown_table
from unlearn_engine.api.json_records import read_vlguard
from unlearn_engine.atomic import atomic_path, check_writable
from unlearn_engine.checks import fail, require


def _read_json_flag(path, flag):
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as err:
        fail(f"{flag} {path}: not valid JSON ({err})")


def prepare_vlguard_split(args):
    """(forget, retain, unused response keys) for `vlguard-split`, every input checked; nothing is written.

    Forget: the unsafe queries of --train (subsets "unsafes" and "safe_unsafes"), each with the harmful
    response --responses maps its image path (as written in --train) or, failing that, its id to. Retain: the
    safe queries ("safe_safes") with their own VLGuard responses. With --image-root each image must exist under
    it and is written joined to it; --out must be writable."""
    check_input_file(args.train, "--train")
    check_input_file(args.responses, "--responses")
    items = _read_json_flag(args.train, "--train")
    require(isinstance(items, list), f"--train {args.train}: expected a JSON list of VLGuard records, got "
                                     f"{type(items).__name__}")
    responses = _read_json_flag(args.responses, "--responses")
    require(isinstance(responses, dict), f"--responses {args.responses}: expected a JSON object mapping image path "
                                         f"or id to harmful response, got {type(responses).__name__}")
    for key, value in responses.items():
        require(isinstance(value, str) and value.strip() != "",
                f"--responses {args.responses}: key {key!r}: expected a non-empty string response, got {value!r}")
    if args.image_root is not None:
        require(os.path.isdir(args.image_root), f"--image-root {args.image_root}: no such folder")
    flags = {item.get("safe") for item in items if isinstance(item, dict)}
    subsets = ([("unsafes", False)] if False in flags or True not in flags else []) + (  # read: checked
        [("safe_unsafes", False), ("safe_safes", True)] if True in flags else [])
    forget, retain, used = [], [], set()
    for subset, safe in subsets:
        written = read_vlguard(args.train, subset)  # images as written: the keys of --responses
        resolved = read_vlguard(args.train, subset, image_root=args.image_root) if args.image_root else written
        for r, out in zip(written, resolved):
            if safe:
                retain.append(out)
                continue
            key = r.image if r.image in responses else r.group
            require(key in responses, f"--responses {args.responses}: no harmful response for the unsafe query of "
                                      f"--train record id {r.group!r} (subset {subset}): neither its image "
                                      f"{r.image!r} nor its id {r.group!r} is a key")
            used.add(key)
            forget.append(dataclasses.replace(out, response=responses[key], role="forget"))
    require(forget, f"--train {args.train} holds no unsafe query (subsets unsafes, safe_unsafes)")
    check_writable(args.out, "--out")
    return forget, retain, sorted(set(responses) - used)


def run_vlguard_split(args):
    forget, retain, unused = args.prepared  # checked and read by prepare_vlguard_split
    paths = {name: os.path.join(args.out, f"{name}.jsonl") for name in ("forget", "retain")}
    os.makedirs(args.out, exist_ok=True)
    with atomic_path(paths["forget"]) as forget_tmp, atomic_path(paths["retain"]) as retain_tmp:
        write_jsonl(forget, forget_tmp)  # both renamed into place only once both are written
        write_jsonl(retain, retain_tmp)
    row = {"forget": len(forget), "retain": len(retain), "unused_responses": len(unused)}
    print(json.dumps({**row, "files": paths}, indent=2) if args.json else markdown_table([row], list(row)))
    return 0
