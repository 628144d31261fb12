"""The teacher behind an OpenAI-compatible endpoint as eval's reference: a Runtime that answers, and cannot score.

    # eval of a run whose recipe has teacher: {source: endpoint} and generate.endpoint
    edgedistill run recipe.yaml --out runs/remote --from eval

The endpoint answers greedily (edgedistill.data.remote: concurrency, retries, a whole-request
deadline); the prompts are measured with the teacher folder's tokenizer and config (the served
model's, edgedistill.sources.endpoint) to skip those past its context. An answer the endpoint stays
unable to give after its retries is an empty answer, which the task's scorers count as wrong.
There are no log-probs of given ids through a chat API, so eval's KL and top-1 against the
teacher are left out for such a reference (eval.score_records is taken as 0).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from edgedistill.data.remote import Request, answer_remote, without_end_tokens
from edgedistill.errors import EdgedistillError
from edgedistill.layout import HF_CONFIG
from edgedistill.recipe import EndpointConfig
from edgedistill.runtimes.common import declared_stop_tokens
from edgedistill.runtimes.pytorch import load_tokenizer


class EndpointRuntime:
    """The Runtime interface's generating half on a chat endpoint; `folder`: the teacher folder."""

    def __init__(self, endpoint: EndpointConfig, folder: Path):
        self.endpoint, self.folder = endpoint, Path(folder)
        self.tokenizer = load_tokenizer(self.folder)
        config = json.loads((self.folder / HF_CONFIG).read_text(encoding="utf-8"))
        self.vocab_size = len(self.tokenizer)
        self.context_length = config.get("max_position_embeddings") or config.get("text_config", {}).get(
            "max_position_embeddings")
        self.bos_id, self.eos_id = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        self.end_texts = [text for text in declared_stop_tokens(self.folder).values() if text]
        self.failed = 0  # answers the endpoint could not give, answered "" instead

    def prompt_ids(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> list[int]:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)

    def generate(self, conversations: list[list[dict[str, str]]], max_new_tokens: int) -> list[tuple[str, bool]]:
        answers: list[tuple[str, bool]] = [("", False)] * len(conversations)
        lock = threading.Lock()

        def on_answer(request, completion):
            with lock:
                answers[request.key[0]] = (without_end_tokens(completion.text, self.end_texts), completion.finished)

        def on_skip(request, error):
            with lock:
                self.failed += 1

        answer_remote(self.endpoint, [Request((i, 0), messages, seed=0) for i, messages in enumerate(conversations)],
                      max_new_tokens=max_new_tokens, temperature=0.0, on_answer=on_answer, on_skip=on_skip)
        return answers

    def _cannot(self, what: str):
        raise EdgedistillError(f"the endpoint teacher cannot {what}: a chat API gives log-probs only of what it "
                               "generates", "score against a local teacher (teacher.source: a model file or folder)")

    def score(self, ids, *, last=None):
        self._cannot("score given token ids")

    def stream(self, messages, max_new_tokens):
        self._cannot("stream here")

    def greedy_ids(self, prompt, max_new_tokens):
        self._cannot("continue token ids")

    def is_end(self, token: int) -> bool:
        return token == self.eos_id

    def encode(self, text: str, *, add_special: bool) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
