"""The model runtime: the model loaded once, and one request's generation, streamed token by token."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import structlog
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from shared.contract import JobRequest
from shared.errors import GptossError
from shared.harmony import FINAL_CHANNEL, HarmonyChat
from shared.prompts import prompt_token_ids
from shared.registry import ModelSpec
from shared.settings import Settings
from shared.vocab import VOCAB_FILE
from workers.batch import DecodeBatch, Decoder
from workers.completion import Completion, Generation, TokenSink
from workers.cpu_precision import add_bf16_path, native_cpu_bf16
from workers.grammar import constraint_for, grammar_tokenizer
from workers.kv_budget import model_kv_bytes_per_token
from workers.model_store import ModelUnavailable, prepare
from workers.output import OutputText
from workers.placement import Placement
from workers.sampling import logprob_sink
from workers.serial import SerialDecoder

log = structlog.get_logger()

__all__ = ["Generation", "ModelRuntime", "TokenSink", "load_dtype", "pick_device"]


def pick_device(configured: str | None) -> str:
    """The configured device, else the first GPU, else the CPU."""
    if configured:
        return configured
    return "cuda:0" if torch.cuda.is_available() else "cpu"


def load_dtype(
    spec: ModelSpec, settings: Settings, placement: Placement, folder: Path
) -> tuple[torch.dtype | str, bool]:
    """The dtype `spec` loads in as `placement` says, and whether its linear layers get a bf16 path
    for small steps (workers/cpu_precision.py). `GPTOSS_DTYPE` when set; else the registry's dtype,
    except that a batching worker on one CPU that lacks native bf16 loads bf16 weights as float32
    with a bf16 copy, when the two copies fit in half the memory available (never a quantised
    checkpoint: its file size says nothing of its dequantised size)."""
    if settings.dtype != "auto":
        return getattr(torch, settings.dtype), False
    stored = getattr(torch, spec.dtype) if spec.dtype != "auto" else "auto"
    on_cpu = placement.kind == "device" and placement.device.startswith("cpu")
    if stored != torch.bfloat16 or not on_cpu or settings.batch_size() == 1:
        return stored, False
    if native_cpu_bf16() or "quantization_config" in json.loads((folder / "config.json").read_text()):
        return stored, False
    weights = sum(f.stat().st_size for f in folder.glob("*.safetensors"))  # bf16: 2 bytes a weight
    if 3 * weights > psutil.virtual_memory().available / 2:
        return stored, False
    return torch.float32, True


class NotOnTensorParallel(GptossError):
    code, status, kind = "unsupported_on_tensor_parallel", 422, "invalid_request_error"


class TokenStreamer(BaseStreamer):
    """Hands each new token id to `on_token` as generate() makes it (its first put is the prompt)."""

    def __init__(self, on_token: Callable[[int], None]):
        self._on_token = on_token
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self._on_token(int(token))

    def end(self) -> None:
        pass


class StopWhenEnded(StoppingCriteria):
    """Ends generation once the completion ended (a stop string; the streamer sees each token first)."""

    def __init__(self, completion: Completion):
        self._completion = completion

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        ended = self._completion.ended
        return torch.full((input_ids.shape[0],), ended, dtype=torch.bool, device=input_ids.device)


class StopOnCancel(StoppingCriteria):
    """Ends generation at the decode step after `cancelled()` turns true (a client cancelled the job)."""

    def __init__(self, cancelled: Callable[[], bool]):
        self._cancelled = cancelled
        self.fired = False

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        self.fired = self.fired or self._cancelled()
        return torch.full((input_ids.shape[0],), self.fired, dtype=torch.bool, device=input_ids.device)


class ModelRuntime:
    """One model, placed on one device, a pipeline of GPUs or tensor-parallel ranks, ready to generate."""

    def __init__(
        self,
        spec: ModelSpec,
        model: Any,
        tokenizer: Any,
        device: str,
        chat: HarmonyChat | None = None,
        relay: Any = None,
    ):
        self.spec, self.model, self.tokenizer, self.device = spec, model, tokenizer, device
        self.chat, self.relay = chat, relay
        self._grammar_tokenizer: Any = None  # llguidance's view of a chat template's tokenizer, once built
        self.vocab_file = Path(VOCAB_FILE)  # o200k's ranks (harmony models' grammars), set by `load`
        self.ignore_eos = False
        """Bench only (GPTOSS_IGNORE_EOS): end tokens do not end a completion, so every request makes
        its max_tokens (random weights end at random)."""

    @classmethod
    def load(cls, spec: ModelSpec, settings: Settings, placement: Placement | None = None) -> ModelRuntime:
        """Prepare (once) and load `spec` as `placement` says (default: the configured device)."""
        started = time.perf_counter()
        placement = placement or Placement("device", pick_device(settings.device))
        folder: Path = prepare(
            spec, settings.cache_dir, vocab_dir=settings.vocab_dir(), local_path=settings.model_path
        )
        dtype, bf16_path = load_dtype(spec, settings, placement, folder)
        extra: dict[str, Any] = {}
        if spec.chat_format == "harmony":
            # gpt-oss's attention sinks rule out sdpa; flex does not run it on CPU. Eager works
            # everywhere (a flash-attention kernel with sinks is faster on GPUs: not wired yet).
            extra["attn_implementation"] = "eager"
        relay, ep_size = None, 1
        if spec.source == "random" and placement.kind != "device":
            raise ModelUnavailable(
                f"`{spec.name}` has random weights made on one device: serve it from a gpu-single worker."
            )
        if placement.kind == "tensor-parallel":
            from transformers.distributed import DistributedConfig

            from workers.tensor_parallel import RequestRelay, start_group

            relay = RequestRelay(start_group(placement.device, settings.tp_timeout))
            ep_size = expert_parallel_size(folder, placement.world_size)
            extra["distributed_config"] = DistributedConfig(tp_size=placement.world_size, ep_size=ep_size)
            model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, **extra)
        elif placement.kind == "pipeline":
            model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, device_map="auto", **extra)
        elif spec.source == "random":  # weights made on the device itself (workers/random_model.py)
            from workers.random_model import build_random

            model = build_random(folder, dtype, placement.device, **extra)
            if bf16_path:
                add_bf16_path(model)
        else:
            model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, **extra)
            model = model.to(placement.device)
            if bf16_path:
                add_bf16_path(model)
        model.eval()
        if spec.chat_format == "harmony":
            chat, tokenizer = HarmonyChat(settings.vocab_dir()), None
        else:
            chat, tokenizer = None, AutoTokenizer.from_pretrained(str(folder))
        log.info(
            "model_loaded",
            model=spec.name,
            placement=placement.kind,
            device=placement.device,
            world_size=placement.world_size,
            expert_parallel=ep_size,
            dtype=str(model.dtype),
            bf16_small_steps=bf16_path,
            seconds=round(time.perf_counter() - started, 3),
        )
        runtime = cls(spec, model, tokenizer, placement.device, chat, relay)
        runtime.ignore_eos = settings.ignore_eos
        runtime.vocab_file = settings.vocab_dir() / VOCAB_FILE
        return runtime

    def generate(
        self,
        request: JobRequest,
        on_first_token: Callable[[], None] | None = None,
        on_text: TokenSink | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> Generation:
        """Generate for `request` alone: `on_first_token` when the first token exists, `on_text` with
        each piece of text; stop early once `cancelled()` (see `complete` under tensor parallel)."""
        completion = self.completion(request, on_first_token, on_text)
        return completion.result(cancelled=self.complete(request, completion, cancelled))

    def complete(
        self, request: JobRequest, completion: Completion, cancelled: Callable[[], bool] | None = None
    ) -> bool:
        """Decode `completion` (of `request`) to its end alone; whether `cancelled()` stopped it. Under
        tensor parallel, the other ranks are handed the request first (they `run` it), and a cancel is
        not honoured mid-generation (every rank must run the same steps)."""
        if self.relay is not None:
            request = self.relay.share(request) or request
            cancelled = None
        return self._decode_alone(request, completion, cancelled)

    def run(
        self,
        request: JobRequest,
        on_first_token: Callable[[], None] | None = None,
        on_text: TokenSink | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> Generation:
        """Generate on this process alone (each tensor-parallel rank runs this in lockstep)."""
        completion = self.completion(request, on_first_token, on_text)
        return completion.result(cancelled=self._decode_alone(request, completion, cancelled))

    def _decode_alone(
        self, request: JobRequest, completion: Completion, cancelled: Callable[[], bool] | None
    ) -> bool:
        """`model.generate` over `completion`'s prompt, each token handed to it as it comes."""
        input_ids = torch.tensor([completion.prompt_ids], device=self.device)
        config = self._generation_config(request, completion.max_tokens)
        if request.seed is not None:
            torch.manual_seed(request.seed)
        cancel = StopOnCancel(cancelled) if cancelled is not None else None
        with torch.inference_mode():
            self.model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                generation_config=config,
                streamer=TokenStreamer(completion.add),
                stopping_criteria=[StopWhenEnded(completion), *([cancel] if cancel is not None else [])],
            )
        return cancel is not None and cancel.fired

    @property
    def can_batch(self) -> bool:
        """Requests may share decode steps (not under tensor parallel: every rank must run the same
        steps, and only single requests are relayed)."""
        return self.relay is None

    def prompt_ids(self, request: JobRequest) -> list[int]:
        """Token ids of `request`'s prompt."""
        return prompt_token_ids(self.chat if self.chat is not None else self.tokenizer, request)

    def prompt_length(self, request: JobRequest) -> int:
        """Tokens of `request`'s prompt."""
        return len(self.prompt_ids(request))

    def completion(
        self,
        request: JobRequest,
        on_first_token: Callable[[], None] | None = None,
        on_text: TokenSink | None = None,
        prompt_ids: list[int] | None = None,
    ) -> Completion:
        """`request` rendered (unless its `prompt_ids` are given) and ready to grow token by token."""
        ids = prompt_ids if prompt_ids is not None else self.prompt_ids(request)
        max_tokens = request.max_tokens or 1
        eos = set() if self.ignore_eos else _as_set(self._generation_config(request, max_tokens).eos_token_id)
        if self.relay is not None and (request.response_format is not None or request.logprobs):
            raise NotOnTensorParallel(
                "`response_format` and `logprobs` need a batching worker; tensor-parallel workers decode "
                "through `generate` alone."
            )
        output = OutputText(request.stop)
        made: list[Completion] = []  # the completion, once made: its logprobs go with its text
        if request.logprobs and on_text is not None:
            on_text = logprob_sink(on_text, made, self.token_bytes)
        decode, in_content = self._decoder(output, on_text, request)
        completion = Completion(
            ids, max_tokens, eos, output, decode, on_first_token, on_text, self.chat is not None, in_content
        )
        completion.constraint = constraint_for(self, request, completion)
        made.append(completion)
        return completion

    def token_bytes(self, token: int) -> bytes:
        """The bytes token `token` stands for (what logprobs show)."""
        return bytes(grammar_tokenizer(self).decode_bytes([token]))

    def decoder(self, prefill_chunk: int = 0) -> Decoder:
        """Where a worker's session decodes its rows: one batch (long prompts prefilled
        `prefill_chunk` tokens per step), or one row at a time where requests cannot share decode
        steps."""
        return self.new_batch(prefill_chunk) if self.can_batch else SerialDecoder(self)

    def new_batch(self, prefill_chunk: int = 0) -> DecodeBatch:
        """An empty batch on this model."""
        pad = self.model.config.pad_token_id
        if pad is None and self.tokenizer is not None:
            pad = self.tokenizer.pad_token_id
        return DecodeBatch(self.model, self.device, int(pad if pad is not None else 0), prefill_chunk)

    def kv_bytes_per_token(self) -> int:
        """Bytes of KV cache one token takes in a batch (every layer kept whole)."""
        return model_kv_bytes_per_token(self.model.config, self.model.dtype.itemsize)

    def _decoder(
        self, output: OutputText, on_text: TokenSink | None, request: JobRequest | None = None
    ) -> tuple[Callable[[int | None], None], Callable[[int | None], bool] | None]:
        """A function taking each new token (None at the end) that turns them into channel text; and,
        for harmony, whether the next token is text of the final message."""

        def emit(deltas: list[tuple[str, str]]) -> None:
            if on_text is not None:
                for channel, text in deltas:
                    on_text(channel, text)

        if self.chat is not None:
            parser = self.chat.parser(request)

            def harmony(token: int | None) -> None:
                delta = parser.feed(token) if token is not None else parser.finish()
                if delta is not None:
                    emit(output.add(delta.channel, delta.text))
                if parser.over:  # the turn's calls are done: the model went on with something else
                    output.stop()

            return harmony, parser.in_final_message
        from tokenizers.decoders import DecodeStream

        stream = DecodeStream(skip_special_tokens=True)
        backend = self.tokenizer.backend_tokenizer

        def template(token: int | None) -> None:
            if token is not None and (text := stream.step(backend, token)):
                emit(output.add(FINAL_CHANNEL, text))

        return template, None

    def _generation_config(self, request: JobRequest, max_tokens: int) -> GenerationConfig:
        # Built from scratch so only the request's parameters apply, not a checkpoint's defaults.
        base = self.model.generation_config
        if self.chat is not None:
            eos: Any = self.chat.stop_token_ids(request)
            pad = self.model.config.pad_token_id if self.model.config.pad_token_id is not None else eos[0]
        else:
            eos = base.eos_token_id
            pad = self.tokenizer.pad_token_id
            pad = pad if pad is not None else base.eos_token_id
        temperature = 1.0 if request.temperature is None else request.temperature
        sampling: dict[str, Any] = {"do_sample": False}
        if temperature > 0:
            top_p = 1.0 if request.top_p is None else request.top_p
            sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
        return GenerationConfig(
            max_new_tokens=max_tokens,
            eos_token_id=None if self.ignore_eos else eos,
            bos_token_id=base.bos_token_id,
            pad_token_id=pad,
            **sampling,
        )


def expert_parallel_size(folder: Path, world_size: int) -> int:
    """Ranks the experts are split over: all of them when they divide the experts evenly, else none.

    gpt-oss's own tensor-parallel plan shards only the embedding; the experts (most of the 120B's
    weights) are split only by expert parallelism.
    """
    import json

    experts = json.loads((folder / "config.json").read_text()).get("num_local_experts", 0)
    return world_size if experts and experts % world_size == 0 else 1


def _as_set(value: int | list[int] | None) -> set[int]:
    if value is None:
        return set()
    return {value} if isinstance(value, int) else set(value)
