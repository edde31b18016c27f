"""Prompt and SFT datasets, their collation into DataProto, and a resumable loader.

Data files are ``.parquet`` or ``.jsonl``; one row per example. Columns read:

- ``prompt`` (or ``prompt_key``): a string, or a list of chat messages ``[{"role", "content"}]``
- ``ground_truth``: anything (verl-style ``reward_model: {"ground_truth": ...}`` also accepted)
- ``data_source``: str, optional (default ``"unknown"``); ``extra_info``: dict, optional
- SFT only: ``response`` (or ``response_key``): the target string

Other columns are ignored. Chat messages go through ``tokenizer.apply_chat_template(...,
add_generation_prompt=True, tokenize=False)``; a plain string does too when the tokenizer has a
chat template and ``apply_chat_template`` is ``"auto"`` or ``True`` (wrapped as one user
message), otherwise it is used as raw text. Templated text is tokenized with
``add_special_tokens=False`` (the template places its own specials); raw text with the
tokenizer's defaults.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from hybridflow.protocol import DataProto

logger = logging.getLogger("hybridflow.data")


class DataError(ValueError):
    """A data file or row that cannot be used; the message names the file (and row/column)."""


# ----------------------------------------------------------------------------- file reading
def _as_file_list(files: Any) -> list[Path]:
    if isinstance(files, (str, Path)):
        files = [files]
    paths = [Path(f) for f in files]
    if not paths:
        raise DataError("no data files given")
    return paths


def read_rows(path: str | Path) -> list[dict]:
    """All rows of one ``.parquet`` or ``.jsonl`` file as dicts (DataError on any problem)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path} (resolved: {path.resolve()})")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as exc:  # noqa: BLE001 - any pyarrow failure means an unreadable file
            raise DataError(f"{path}: cannot read parquet file: {exc}") from exc
    elif suffix == ".jsonl":
        rows = []
        with path.open(encoding="utf-8") as handle:
            for line_no, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}: line {line_no} is not valid JSON: {exc}") from exc
                if not isinstance(row, dict):
                    raise DataError(f"{path}: line {line_no} is a JSON {type(row).__name__}, expected an object")
                rows.append(row)
    else:
        raise DataError(f"{path}: unsupported data file extension {path.suffix!r}; use .parquet or .jsonl")
    if not rows:
        raise DataError(f"{path}: the file has no rows")
    return rows


def _require_column(path: Path, rows: list[dict], key: str) -> None:
    for i, row in enumerate(rows):
        if key not in row:
            raise DataError(f"{path}: row {i} has no {key!r} column (columns present: {sorted(row)})")
        if row[key] is None:
            raise DataError(f"{path}: row {i}: {key!r} is null")


def _ground_truth(row: dict) -> Any:
    if "ground_truth" in row and row["ground_truth"] is not None:
        return row["ground_truth"]
    reward_model = row.get("reward_model")
    if isinstance(reward_model, dict):
        return reward_model.get("ground_truth")
    return None


# ----------------------------------------------------------------------------- prompt text
def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_to_text(prompt: Any, tokenizer: Any, apply_chat_template: bool | str, where: str) -> tuple[str, bool]:
    """The text of one prompt and whether a chat template produced it. ``where`` names the
    file and row for error messages."""
    use_template = has_chat_template(tokenizer) if apply_chat_template == "auto" else bool(apply_chat_template)
    if isinstance(prompt, str):
        if not use_template:
            return prompt, False
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, (list, tuple)) and prompt and all(
            isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
        messages = [dict(m) for m in prompt]
        if not use_template:
            raise DataError(f"{where}: the prompt is a list of chat messages but apply_chat_template="
                            f"{apply_chat_template!r}; chat messages need a chat template")
    else:
        raise DataError(f"{where}: prompt must be a string or a non-empty list of "
                        f"{{'role', 'content'}} messages, got {type(prompt).__name__}: {str(prompt)[:80]!r}")
    if not has_chat_template(tokenizer):
        raise DataError(f"{where}: the prompt needs a chat template but the tokenizer "
                        f"({type(tokenizer).__name__}) has none; set tokenizer.chat_template or "
                        "use plain string prompts with apply_chat_template=False")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return text, True


def _tokenize(tokenizer: Any, texts: list[str], templated: list[bool]) -> list[list[int]]:
    """Token ids of each text; batched per add_special_tokens setting."""
    out: list[list[int]] = [[] for _ in texts]
    for flag in (True, False):
        idx = [i for i, t in enumerate(templated) if t == flag]
        if idx:
            ids = tokenizer([texts[i] for i in idx], add_special_tokens=not flag)["input_ids"]
            for i, row in zip(idx, ids):
                out[i] = list(row)
    return out


def pad_token_id(tokenizer: Any) -> int:
    """``tokenizer.pad_token_id``, else the EOS id (with a logged note)."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is None:
        raise DataError(f"tokenizer {type(tokenizer).__name__} has neither a pad nor an eos token")
    logger.info("tokenizer has no pad token; padding with the eos token (id %d)", tokenizer.eos_token_id)
    return int(tokenizer.eos_token_id)


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """``clamp(cumsum(mask) - 1, min=0)`` along the last dimension."""
    return torch.clamp(torch.cumsum(mask, dim=-1) - 1, min=0)


def _pad(seqs: Sequence[Sequence[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, seq in enumerate(seqs):
        if not seq:
            continue
        cols = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[i, cols] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask


# ----------------------------------------------------------------------------- prompt dataset
class PromptDataset:
    """Prompts for RL rollouts, read eagerly and tokenized once.

    ``dataset[i]`` is a dict with ``raw_prompt`` (text after the chat template), ``prompt_ids``,
    ``ground_truth``, ``data_source``, ``extra_info``, ``index`` (= i) and ``source``
    (``"file:row"``). Prompts longer than ``max_prompt_length`` tokens are dropped (count in
    ``num_filtered``, logged) or, with ``filter_overlong=False``, raise DataError.
    """

    def __init__(self, files: str | Path | Sequence[str | Path], tokenizer: Any, *, prompt_key: str = "prompt",
                 max_prompt_length: int = 1024, filter_overlong: bool = True,
                 apply_chat_template: bool | str = "auto"):
        if apply_chat_template not in ("auto", True, False):
            raise DataError(f"apply_chat_template must be 'auto', True or False, got {apply_chat_template!r}")
        self.files = _as_file_list(files)
        self.tokenizer = tokenizer
        self.prompt_key = prompt_key
        self.max_prompt_length = int(max_prompt_length)
        self.num_filtered = 0
        self.rows: list[dict] = []
        total = 0
        for path in self.files:
            rows = read_rows(path)
            _require_column(path, rows, prompt_key)
            total += len(rows)
            texts, templated = zip(*(prompt_to_text(r[prompt_key], tokenizer, apply_chat_template, f"{path}: row {i}")
                                     for i, r in enumerate(rows)))
            for i, (row, text, ids) in enumerate(zip(rows, texts, _tokenize(tokenizer, list(texts), list(templated)))):
                if len(ids) > self.max_prompt_length:
                    if not filter_overlong:
                        raise DataError(f"{path}: row {i}: prompt has {len(ids)} tokens > max_prompt_length="
                                        f"{self.max_prompt_length} (set filter_overlong=True to drop such rows)")
                    self.num_filtered += 1
                    continue
                extra = row.get("extra_info")
                self.rows.append({
                    "raw_prompt": text, "prompt_ids": ids, "ground_truth": _ground_truth(row),
                    "data_source": row.get("data_source") or "unknown",
                    "extra_info": dict(extra) if isinstance(extra, dict) else {},
                    "index": len(self.rows), "source": f"{path}:{i}"})
        if self.num_filtered:
            logger.warning("filtered %d of %d prompts longer than max_prompt_length=%d tokens (%s)",
                           self.num_filtered, total, self.max_prompt_length, ", ".join(map(str, self.files)))
        if not self.rows:
            raise DataError(f"{', '.join(map(str, self.files))}: no prompts left after dropping "
                            f"{self.num_filtered} longer than max_prompt_length={self.max_prompt_length}")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]

    def collate(self, rows: Sequence[dict]) -> DataProto:
        return collate_prompts(rows, self.tokenizer, self.max_prompt_length)


def collate_prompts(rows: Sequence[dict], tokenizer: Any, max_prompt_length: int | None = None) -> DataProto:
    """Rows of a PromptDataset → DataProto, left-padded to the longest prompt of the batch.

    Tensors ``input_ids``, ``attention_mask``, ``position_ids`` ``[B, P]`` (long); non-tensors
    ``raw_prompt``, ``ground_truth``, ``data_source``, ``extra_info``, ``index``. A row without
    ``prompt_ids`` is tokenized from ``raw_prompt`` (raw text, tokenizer defaults). A prompt longer
    than ``max_prompt_length`` raises DataError.
    """
    if not rows:
        raise DataError("collate_prompts: empty batch")
    seqs = []
    for row in rows:
        ids = row.get("prompt_ids")
        if ids is None:
            ids = tokenizer(row["raw_prompt"])["input_ids"]
        if max_prompt_length is not None and len(ids) > max_prompt_length:
            raise DataError(f"{row.get('source', 'row ' + str(row.get('index')))}: prompt has {len(ids)} tokens "
                            f"> max_prompt_length={max_prompt_length}")
        seqs.append(ids)
    input_ids, mask = _pad(seqs, pad_token_id(tokenizer), left=True)
    non_tensors = {
        "raw_prompt": [r["raw_prompt"] for r in rows],
        "ground_truth": [r.get("ground_truth") for r in rows],
        "data_source": [r.get("data_source", "unknown") for r in rows],
        "extra_info": [r.get("extra_info") or {} for r in rows],
        "index": np.asarray([r.get("index", i) for i, r in enumerate(rows)], dtype=np.int64),
    }
    tensors = {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids_from_mask(mask)}
    return DataProto.from_dict(tensors, non_tensors)


# ----------------------------------------------------------------------------- SFT dataset
class SFTDataset:
    """(prompt, response) pairs for supervised fine-tuning.

    Each example is ``prompt_ids + response_ids + [eos]``; the loss covers the response tokens and
    the EOS. Examples longer than ``max_length`` are handled by ``overlong``: ``"filter"`` drops
    them (``num_filtered``), ``"truncate"`` cuts the response from the right (``num_truncated``;
    rows whose prompt alone fills ``max_length`` are still dropped), ``"error"`` raises DataError.
    """

    def __init__(self, files: str | Path | Sequence[str | Path], tokenizer: Any, *, prompt_key: str = "prompt",
                 response_key: str = "response", max_length: int = 1024, overlong: str = "filter",
                 apply_chat_template: bool | str = "auto"):
        if overlong not in ("filter", "truncate", "error"):
            raise DataError(f"overlong must be 'filter', 'truncate' or 'error', got {overlong!r}")
        if tokenizer.eos_token_id is None:
            raise DataError(f"SFTDataset: tokenizer {type(tokenizer).__name__} has no eos token to end responses")
        self.files = _as_file_list(files)
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.num_filtered = 0
        self.num_truncated = 0
        self.rows: list[dict] = []
        eos = int(tokenizer.eos_token_id)
        for path in self.files:
            rows = read_rows(path)
            _require_column(path, rows, prompt_key)
            _require_column(path, rows, response_key)
            texts, templated = zip(*(prompt_to_text(r[prompt_key], tokenizer, apply_chat_template, f"{path}: row {i}")
                                     for i, r in enumerate(rows)))
            prompt_ids = _tokenize(tokenizer, list(texts), list(templated))
            responses = [r[response_key] for r in rows]
            for i, resp in enumerate(responses):
                if not isinstance(resp, str):
                    raise DataError(f"{path}: row {i}: {response_key!r} must be a string, got {type(resp).__name__}")
            response_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
            for i, (p_ids, r_ids) in enumerate(zip(prompt_ids, response_ids)):
                r_ids = list(r_ids) + [eos]
                n = len(p_ids) + len(r_ids)
                if n > self.max_length:
                    if overlong == "error":
                        raise DataError(f"{path}: row {i}: example has {n} tokens > max_length={self.max_length}")
                    if overlong == "filter" or len(p_ids) >= self.max_length:
                        self.num_filtered += 1
                        continue
                    r_ids = r_ids[: self.max_length - len(p_ids)]
                    self.num_truncated += 1
                self.rows.append({"prompt_ids": p_ids, "response_ids": r_ids, "raw_prompt": texts[i],
                                  "index": len(self.rows), "source": f"{path}:{i}"})
        if self.num_filtered or self.num_truncated:
            logger.warning("SFT data: dropped %d and truncated %d examples longer than max_length=%d (%s)",
                           self.num_filtered, self.num_truncated, self.max_length, ", ".join(map(str, self.files)))
        if not self.rows:
            raise DataError(f"{', '.join(map(str, self.files))}: no SFT examples left after dropping "
                            f"{self.num_filtered} longer than max_length={self.max_length}")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]

    def collate(self, rows: Sequence[dict]) -> DataProto:
        return collate_sft(rows, self.tokenizer)


def collate_sft(rows: Sequence[dict], tokenizer: Any) -> DataProto:
    """SFT rows (``prompt_ids``, ``response_ids``) → DataProto, right-padded to the longest row.

    Tensors ``[B, L]`` long: ``input_ids``, ``attention_mask``, ``position_ids`` and ``loss_mask``
    (1 where the token is a response token, including the EOS, i.e. a prediction target; 0 on
    prompt and padding). Non-tensors ``raw_prompt`` and ``index``.
    """
    if not rows:
        raise DataError("collate_sft: empty batch")
    seqs = [list(r["prompt_ids"]) + list(r["response_ids"]) for r in rows]
    input_ids, mask = _pad(seqs, pad_token_id(tokenizer), left=False)
    loss_mask = torch.zeros_like(mask)
    for i, row in enumerate(rows):
        start = len(row["prompt_ids"])
        loss_mask[i, start:start + len(row["response_ids"])] = 1
    tensors = {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids_from_mask(mask),
               "loss_mask": loss_mask}
    non_tensors = {"raw_prompt": [r.get("raw_prompt", "") for r in rows],
                   "index": np.asarray([r.get("index", i) for i, r in enumerate(rows)], dtype=np.int64)}
    return DataProto.from_dict(tensors, non_tensors)


# ----------------------------------------------------------------------------- preference pairs
class PairDataset:
    """(prompt, chosen, rejected) rows for reward-model training.

    Each side is tokenized as an SFT example (``prompt_ids + response_ids + [eos]``, see
    :class:`SFTDataset`), the form in which a reward model later scores a rollout. A pair one side
    of which is longer than ``max_length`` tokens is dropped (``num_filtered``, logged); a pair
    whose two responses are the same string raises DataError. ``dataset[i]`` has ``prompt_ids``,
    ``chosen_ids``, ``rejected_ids`` (response + EOS), ``raw_prompt``, ``index``, ``source``.
    """

    def __init__(self, files: str | Path | Sequence[str | Path], tokenizer: Any, *, prompt_key: str = "prompt",
                 chosen_key: str = "chosen", rejected_key: str = "rejected", max_length: int = 1024,
                 apply_chat_template: bool | str = "auto"):
        sides = [SFTDataset(files, tokenizer, prompt_key=prompt_key, response_key=key, max_length=2 ** 62,
                            apply_chat_template=apply_chat_template) for key in (chosen_key, rejected_key)]
        self.tokenizer, self.max_length, self.num_filtered = tokenizer, int(max_length), 0
        self.rows: list[dict] = []
        for chosen, rejected in zip(sides[0].rows, sides[1].rows):
            if chosen["response_ids"] == rejected["response_ids"]:
                raise DataError(f"{chosen['source']}: {chosen_key!r} and {rejected_key!r} are the same response")
            if len(chosen["prompt_ids"]) + max(len(chosen["response_ids"]), len(rejected["response_ids"])) > self.max_length:
                self.num_filtered += 1
                continue
            self.rows.append({"prompt_ids": chosen["prompt_ids"], "chosen_ids": chosen["response_ids"],
                              "rejected_ids": rejected["response_ids"], "raw_prompt": chosen["raw_prompt"],
                              "index": len(self.rows), "source": chosen["source"]})
        files_text = ", ".join(map(str, sides[0].files))
        if self.num_filtered:
            logger.warning("pairs: dropped %d longer than max_length=%d (%s)", self.num_filtered, self.max_length,
                           files_text)
        if not self.rows:
            raise DataError(f"{files_text}: no pairs left after dropping {self.num_filtered} longer than "
                            f"max_length={self.max_length}")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]

    def collate(self, rows: Sequence[dict]) -> DataProto:
        return collate_pairs(rows, self.tokenizer)


def collate_pairs(rows: Sequence[dict], tokenizer: Any) -> DataProto:
    """PairDataset rows → DataProto, one row per pair: ``chosen_input_ids``,
    ``chosen_attention_mask``, ``chosen_position_ids`` and the same three ``rejected_*`` columns
    (``prompt + response + eos``, each side right-padded to its own longest row); non-tensors
    ``raw_prompt`` and ``index``."""
    if not rows:
        raise DataError("collate_pairs: empty batch")
    tensors = {}
    for side in ("chosen", "rejected"):
        ids, mask = _pad([list(r["prompt_ids"]) + list(r[f"{side}_ids"]) for r in rows], pad_token_id(tokenizer),
                         left=False)
        tensors.update({f"{side}_input_ids": ids, f"{side}_attention_mask": mask,
                        f"{side}_position_ids": position_ids_from_mask(mask)})
    non_tensors = {"raw_prompt": [r.get("raw_prompt", "") for r in rows],
                   "index": np.asarray([r.get("index", i) for i, r in enumerate(rows)], dtype=np.int64)}
    return DataProto.from_dict(tensors, non_tensors)


# ----------------------------------------------------------------------------- loader
class PromptLoader:
    """Batches of a dataset as DataProto, epoch after epoch, resumable.

    The order of epoch ``e`` is ``numpy.random.default_rng([seed, e]).permutation(n)`` (or
    ``arange(n)`` without shuffle), so it depends only on (seed, epoch). Iteration continues from
    the current state; it stops after ``total_steps`` batches in all (counted as
    ``epoch * len(self) + position``) or never if ``total_steps`` is None. ``state_dict()`` taken
    after a batch, loaded into a fresh loader, makes it yield exactly the batches that follow.
    ``collate_fn`` defaults to ``dataset.collate``.
    """

    def __init__(self, dataset: Any, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = True, total_steps: int | None = None,
                 collate_fn: Callable[[list], DataProto] | None = None):
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        if drop_last and len(dataset) < batch_size:
            raise DataError(f"dataset has {len(dataset)} rows, fewer than batch_size={batch_size} "
                            "(with drop_last=True no batch could be formed)")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = drop_last
        self.total_steps = total_steps
        if collate_fn is None and not hasattr(dataset, "collate"):
            raise DataError(f"PromptLoader: {type(dataset).__name__} has no collate(rows) method; pass collate_fn")
        self.collate_fn = collate_fn or dataset.collate
        self.epoch = 0
        self.position = 0
        self._order: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def steps_taken(self) -> int:
        return self.epoch * len(self) + self.position

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Row indices of one epoch, in the order they are served."""
        if self._order is None or self._order[0] != epoch:
            n = len(self.dataset)
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._order = (epoch, order)
        return self._order[1]

    def next_batch(self) -> DataProto:
        """The next batch; advances the state."""
        if self.total_steps is not None and self.steps_taken >= self.total_steps:
            raise StopIteration
        if self.position >= len(self):
            self.epoch, self.position = self.epoch + 1, 0
        start = self.position * self.batch_size
        indices = self.epoch_order(self.epoch)[start:start + self.batch_size]
        self.position += 1
        return self.collate_fn([self.dataset[int(i)] for i in indices])

    def __iter__(self) -> Iterator[DataProto]:
        while True:
            try:
                batch = self.next_batch()
            except StopIteration:
                return
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        missing = {"epoch", "position", "seed"} - set(state)
        if missing:
            raise DataError(f"PromptLoader.load_state_dict: state lacks {sorted(missing)}; got keys {sorted(state)}")
        if int(state["seed"]) != self.seed:
            logger.info("PromptLoader: resuming with the checkpoint's seed %s (configured %s)", state["seed"], self.seed)
        self.epoch, self.position, self.seed = int(state["epoch"]), int(state["position"]), int(state["seed"])
        self._order = None
