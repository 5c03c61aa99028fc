"""Instruction-tuning data for the ``causal-lm`` task.

Every example is a conversation to continue: the prompt turns and the reply
the model should learn, plus, where the data has them, what generations are
scored against::

    {"messages": [{"role": "user", "content": "..."}],  # the prompt turns
     "response": "...",     # the assistant reply (None when unknown: predict)
     "answer": "72",        # a single short answer, scored by exact match
     "reference": "...",    # a text generations are scored against (BLEU/chrF)
     "where": "line 3"}

Readable layouts, detected from the column names (or chosen explicitly):
``messages`` (chat: lists of ``{"role", "content"}``; the last assistant turn
is the response), ``instruction``/``input``/``output`` (Alpaca),
``question``/``answer`` (GSM8K: the final answer follows ``#### ``),
``prompt``/``response`` (or ``completion``/``output``), and ``text`` alone
(prompts to complete). Parallel files (``train.en`` + ``train.de``) become
translation instructions.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from adapterkit.data.errors import DataError
from adapterkit.data.examples import TaskData
from adapterkit.data.parallel import is_parallel_path, language_name, read_parallel
from adapterkit.data.sources import read_text
from adapterkit.data.tables import Table, read_table
from adapterkit.data.values import first_missing, is_missing, kind, preview, text_value

TASK = "causal-lm"
ROLES = ("system", "user", "assistant")
# Column layouts tried in order when none is named: (prompt column, response column).
PAIR_LAYOUTS = (("question", "answer"), ("prompt", "response"), ("prompt", "completion"),
                ("prompt", "output"), ("input", "output"), ("source", "target"))
# GSM8K's convention: the solution ends with a line "#### <final answer>".
FINAL_ANSWER = re.compile(r"####\s*(.+?)\s*$")
TRANSLATION_PROMPT = "Translate {source} to {target}: {text}"


def final_answer_of(solution: str) -> str | None:
    """The answer after ``#### `` on the last line of a worked solution, if there is one."""
    lines = solution.strip().splitlines()
    match = FINAL_ANSWER.search(lines[-1]) if lines else None
    return match.group(1).replace(",", "") if match else None


def _text(value: Any, table: Table, i: int, column: str) -> str | None:
    return text_value(value, table.source, table.where(i), f"column {column!r}")


def _chat_turns(value: Any, table: Table, i: int, column: str) -> list[dict[str, str]]:
    if hasattr(value, "tolist") and not isinstance(value, str):  # a list cell read from Parquet
        value = value.tolist()
    if is_missing(value):
        raise DataError(table.source, f"missing value in column {column!r}; expected a non-empty list of "
                        '{"role", "content"} messages', where=table.where(i))
    if not isinstance(value, (list, tuple)) or not value:
        raise DataError(table.source, f"expected a non-empty list of {{\"role\", \"content\"}} messages "
                        f"in column {column!r}, found {kind(value)} {preview(value)}", where=table.where(i))
    turns = []
    for k, turn in enumerate(value):
        if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
            raise DataError(table.source, f"expected message {k + 1} to have a role in {ROLES} and a text "
                            f"content, found {preview(turn)}", where=table.where(i))
        turns.append({"role": turn["role"], "content": turn["content"]})
    return turns


def _example(messages: list[dict[str, str]], response: str | None, where: str,
             answer: str | None = None, reference: str | None = None) -> dict[str, Any]:
    return {"messages": messages, "response": response, "answer": answer, "reference": reference,
            "where": where}


def _layout(columns: Sequence[str], chosen: dict[str, str | None], source: str) -> dict[str, str | None]:
    """Which columns play which part, from explicit choices or the column names."""
    prompt = chosen.get("prompt_column") or chosen.get("text_column")
    response = chosen.get("response_column") or chosen.get("label_column")
    if chosen.get("messages_column") or (prompt is None and "messages" in columns):
        return {"messages": chosen.get("messages_column") or "messages"}
    if prompt is None and "instruction" in columns:
        return {"instruction": "instruction", "input": "input" if "input" in columns else None,
                "response": response or ("output" if "output" in columns else None)}
    if prompt is None:
        for first, second in PAIR_LAYOUTS:
            if first in columns and second in columns:
                prompt, response = first, second
                break
    if prompt is None and "text" in columns:
        prompt = "text"
    if prompt is None:
        raise DataError(source, "expected the columns messages, instruction/input/output, "
                        f"question/answer, prompt/response or text, found {list(columns)}; name them "
                        "with prompt_column=... and response_column=...")
    return {"prompt": prompt, "response": response}


def instructions_from_table(table: Table, labels: Sequence[str] | None = None,
                            **columns: str | None) -> TaskData:
    """``causal-lm`` examples from a table (see the module docstring for the layouts).

    Args:
        table: rows from ``read_table`` or ``table_from_object``.
        labels: unused (the task has no label set); accepted for a uniform reader signature.
        **columns: ``messages_column``, ``prompt_column`` (alias ``text_column``),
            ``response_column`` (alias ``label_column``), ``answer_column``
            (a short answer for exact match), ``system_prompt`` (a system turn
            put before every prompt).
    """
    frame = table.frame
    layout = _layout([str(c) for c in frame.columns], columns, table.source)
    missing = [c for c in layout.values() if c is not None and c not in frame.columns]
    if columns.get("answer_column"):
        missing += [c for c in [columns["answer_column"]] if c not in frame.columns]
    if missing:
        raise DataError(table.source, f"missing column(s) {missing}; the columns found are "
                        f"{[str(c) for c in frame.columns]}")
    system = columns.get("system_prompt")
    examples = []
    for i, row in enumerate(frame.to_dict("records")):
        where = table.where(i)
        if "messages" in layout:
            turns = _chat_turns(row[layout["messages"]], table, i, layout["messages"])
            has_reply = turns[-1]["role"] == "assistant" and len(turns) > 1
            prompt, response = (turns[:-1], turns[-1]["content"]) if has_reply else (turns, None)
        else:
            key = "instruction" if "instruction" in layout else "prompt"
            text = _text(row[layout[key]], table, i, layout[key])
            if not text or not text.strip():
                raise DataError(table.source, f"expected a prompt in column {layout[key]!r}, found "
                                f"{'nothing' if text is None else 'only whitespace'}", where=where)
            extra = _text(row[layout["input"]], table, i, layout["input"]) if layout.get("input") else None
            prompt = [{"role": "user", "content": f"{text}\n\n{extra}" if extra else text}]
            response = _text(row[layout["response"]], table, i, layout["response"]) if layout["response"] else None
            response = response if response and response.strip() else None
        if system and prompt[0]["role"] != "system":
            prompt = [{"role": "system", "content": system}, *prompt]
        answer = columns.get("answer_column") and _text(row[columns["answer_column"]], table, i, "answer")
        answer = answer or (final_answer_of(response) if response else None)
        examples.append(_example(prompt, response, where, answer=answer))
    gap = None if "messages" in layout else first_missing([e["response"] for e in examples])
    if gap is not None:
        raise DataError(table.source, "expected a response, as other rows have, found none; fill it in "
                        "or drop the row", where=examples[gap]["where"])
    chosen = {k: v for k, v in columns.items() if v is not None}
    return TaskData(TASK, examples, None, table.source, chosen)


def translation_instructions(source_texts: Sequence[str], target_texts: Sequence[str],
                             source_language: str, target_language: str, source: str = "<memory>",
                             where: Sequence[str] | None = None) -> TaskData:
    """Translation pairs as instructions ("Translate English to German: ..."), scored by BLEU/chrF.

    The languages are codes (``"en"``) or names (``"English"``); codes are
    written out in the prompt.
    """
    names = language_name(source_language), language_name(target_language)
    examples = []
    for i, (text, target) in enumerate(zip(source_texts, target_texts)):
        prompt = TRANSLATION_PROMPT.format(source=names[0], target=names[1], text=text)
        examples.append(_example([{"role": "user", "content": prompt}], target,
                                 where[i] if where else f"line {i + 1}", reference=target))
    return TaskData(TASK, examples, None, source, {"target_language": target_language})


def read_instruction_file(path: str | os.PathLike, labels: Sequence[str] | None = None,
                          **columns: str | None) -> TaskData:
    """``causal-lm`` examples from a JSON/JSONL/CSV/... file, or from parallel text files.

    A path like ``multi30k/train.en`` whose sibling ``train.de`` exists is read
    as translation pairs (see ``data.parallel``); ``target_language`` picks the
    sibling when there are several.
    """
    if is_parallel_path(path):
        pair = read_parallel(path, columns.get("target_language"))
        return translation_instructions(pair.sources, pair.targets, pair.source_language,
                                        pair.target_language, pair.source, pair.where)
    return instructions_from_table(read_table(path), labels, **columns)


def instructions_from_texts(texts: Sequence[str], system_prompt: str | None = None) -> TaskData:
    """Prompts without responses, one user turn each (what ``predict`` receives)."""
    examples = []
    for i, text in enumerate(texts):
        prompt = [{"role": "user", "content": str(text)}]
        if system_prompt:
            prompt.insert(0, {"role": "system", "content": system_prompt})
        examples.append(_example(prompt, None, f"text {i + 1}"))
    return TaskData(TASK, examples, None, "<texts>")


def read_chatterbot(folder: Path) -> Table:
    """The chatterbot English corpus: consecutive turns of each conversation as prompt/response.

    ``folder`` is the corpus's ``data/english`` folder of YAML files, each a
    ``conversations`` list of lists of strings; 2,306 pairs in version 1.3.3
    (one malformed entry, a bare string, is skipped).
    """
    import yaml

    rows = []
    for file in sorted(Path(folder).glob("*.yml")):
        text = read_text(file)
        try:
            content = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            raise DataError(str(file), f"expected YAML, found text the YAML parser rejects: "
                            f"{getattr(err, 'problem', None) or err}",
                            where=f"line {mark.line + 1}" if mark else None) from None
        if not isinstance(content, dict):
            raise DataError(str(file), f"expected a YAML mapping with a 'conversations' list, found {kind(content)}")
        conversations = content.get("conversations") or []
        for number, conversation in enumerate(conversations, start=1):
            if not isinstance(conversation, list):
                continue
            turns = [str(turn) for turn in conversation]
            for prompt, response in zip(turns, turns[1:]):
                rows.append({"prompt": prompt, "response": response,
                             "category": file.stem, "conversation": number})
    return Table(pd.DataFrame(rows), f"chatterbot ({folder})")
