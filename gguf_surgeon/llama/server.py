"""Run llama.cpp's `llama-server` on a local port for the length of a `with` block.

    with LlamaServer(bin_dir, model_path) as server:
        top = server.next_token_probs([9, 42, 7], n_probs=10)

The server listens on 127.0.0.1 only, on a free port picked at start. `__enter__` returns
once GET /health answers 200; leaving the block (normally, on an exception or on Ctrl-C)
stops the process, with SIGKILL if it ignores SIGTERM. HTTP uses the standard library only:
request_json is the one request function, and apply_chat_template, complete (greedy, with
log-probabilities) and gbnf_literal speak the server's API given only its base URL.
"""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import ToolError
from ..records import Record

SERVER_BINARY = "llama-server"
HOST = "127.0.0.1"
LOG_TAIL_BYTES = 4000  # of the server's log, quoted in errors
PORT_ATTEMPTS = 3  # another process may take the free port between picking and binding it
BIND_FAILURE = "couldn't bind"  # llama-server's log line when its port is taken
ANCHOR_BIAS = 1e6  # logit bias that makes greedy sampling pick a known token
HEALTH_POLL_TIMEOUT = 1.0  # seconds per /health probe; a local server answers (200 or 503) at once

# float32 end to end on the CPU backend: an F32 KV cache, and no flash attention (llama.cpp
# casts K and V to F16 for it); with F32 weights the logits then match a float32 reference
FLOAT32_ARGS = ("--cache-type-k", "f32", "--cache-type-v", "f32", "--flash-attn", "off")


@dataclass(frozen=True)
class TokenProb:
    """One candidate next token with its probability under the model's raw logits."""

    id: int
    token: str  # the token's text piece (may be empty for partial UTF-8)
    logprob: float  # natural log; -inf when the probability underflows


def request_json(
    base_url: str,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
    timeout: float = 120.0,
    *,
    model_name: str | None = None,
    log_tail: Callable[[], str] | None = None,
) -> Any:
    """One JSON request to the llama-server at `base_url`; the decoded JSON answer, or
    ToolError naming the request (and `model_name`), with `log_tail()` for a failure that
    is not an HTTP error status."""
    who = f"{SERVER_BINARY} {method} {path}" + (f" for {model_name}" if model_name else "")
    data = None if body is None else json.dumps(body).encode("utf-8")
    req = urllib.request.Request(
        base_url + path, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read().decode("utf-8"))
    except urllib.error.HTTPError as e:
        detail = e.read().decode("utf-8", "replace")
        raise ToolError(f"{who}: HTTP {e.code}: {detail}") from None
    except (OSError, http.client.HTTPException, ValueError) as e:  # ValueError: not JSON
        reason = getattr(e, "reason", None) or e
        raise ToolError(f"{who}: {reason}" + (f"\n{log_tail()}" if log_tail else "")) from None


def apply_chat_template(
    base_url: str, messages: list[dict[str, str]], enable_thinking: bool | None, timeout: float = 60.0
) -> str:
    """The prompt text the model's own template (--jinja) makes of `messages`, with the
    generation prompt added; `enable_thinking` goes to the template as a kwarg when not None."""
    body: dict[str, Any] = {"messages": messages}
    if enable_thinking is not None:
        body["chat_template_kwargs"] = {"enable_thinking": enable_thinking}
    return str(request_json(base_url, "POST", "/apply-template", body, timeout)["prompt"])


@dataclass(frozen=True)
class Completion(Record):
    text: str
    stop: str  # eos | limit | word
    logprobs: tuple[float, ...]  # of each generated token under the serving model (EOS excluded)


def complete(
    base_url: str,
    prompt: str,
    n_predict: int,
    seed: int,
    timeout: float,
    grammar: str | None = None,
    logprobs: bool = True,
    stop: list[str] | None = None,
) -> Completion:
    """Greedy continuation of a raw prompt (special tokens in it are parsed), no prompt cache,
    so an answer does not depend on earlier requests."""
    body: dict[str, Any] = {
        "prompt": prompt,
        "n_predict": n_predict,
        "temperature": 0.0,
        "top_k": 1,
        "seed": seed,
        "cache_prompt": False,
        "n_probs": 1 if logprobs else 0,
        "post_sampling_probs": False,
    }
    if grammar is not None:
        body["grammar"] = grammar
    if stop:
        body["stop"] = stop
    ans = request_json(base_url, "POST", "/completion", body, timeout)
    ended = str(ans.get("stop_type") or ("eos" if ans.get("stopped_eos") else "limit"))
    probs = ans.get("completion_probabilities") or []
    lps = [float("-inf") if p.get("logprob") is None else float(p["logprob"]) for p in probs]
    if ended == "eos" and lps:
        lps = lps[:-1]  # the end-of-generation token itself is listed last
    return Completion(str(ans.get("content", "")), ended, tuple(lps))


def gbnf_literal(text: str) -> str:
    """A GBNF grammar (llama.cpp's `grammar` parameter) matching exactly `text`."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 32 or ch == "\x7f":
            out.append(f"\\x{ord(ch):02X}")
        else:
            out.append(ch)
    return 'root ::= "' + "".join(out) + '"'


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class LlamaServer:
    """A `llama-server` child process serving one model; use as a context manager.

    `bin_dir` is the folder holding llama-server. `ctx_size` and `threads` map to -c and -t
    (None: llama.cpp's default); `extra_args` are appended as given, e.g. FLOAT32_ARGS to
    compare with a float32 reference. Raises ToolError when the binary
    is missing, the server exits or does not become healthy within `startup_timeout` seconds,
    or a request fails or takes longer than `request_timeout` seconds.
    """

    def __init__(
        self,
        bin_dir: str | Path,
        model: str | Path,
        *,
        ctx_size: int | None = None,
        threads: int | None = None,
        extra_args: Sequence[str] = (),
        startup_timeout: float = 60.0,
        request_timeout: float = 120.0,
        stop_timeout: float = 10.0,
    ):
        self.binary = Path(bin_dir) / SERVER_BINARY
        self.model = Path(model).resolve()
        self.ctx_size = ctx_size
        self.threads = threads
        self.extra_args = tuple(extra_args)
        self.startup_timeout = startup_timeout
        self.request_timeout = request_timeout
        self.stop_timeout = stop_timeout
        self.port: int | None = None
        self._proc: subprocess.Popen | None = None
        self._log: BinaryIO | None = None
        self._reaper: weakref.finalize | None = None

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs (started and not yet stopped)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def url(self) -> str:
        if self.port is None:
            raise ToolError(f"{SERVER_BINARY} for {self.model.name} is not running")
        return f"http://{HOST}:{self.port}"

    # lifecycle
    def command(self, port: int) -> list[str]:
        cmd = [
            str(self.binary),
            "-m",
            str(self.model),
            "--host",
            HOST,
            "--port",
            str(port),
            "--parallel",
            "1",
            "--no-webui",
        ]
        if self.ctx_size is not None:
            cmd += ["-c", str(self.ctx_size)]
        if self.threads is not None:
            cmd += ["-t", str(self.threads)]
        return cmd + list(self.extra_args)

    def start(self) -> LlamaServer:
        """Start the server and wait until it is healthy; on any failure nothing is left running."""
        if self._proc is not None:
            raise ToolError(f"{SERVER_BINARY} for {self.model.name} is already running on port {self.port}")
        if not self.binary.is_file():
            raise ToolError(f"{self.binary}: no such file; build llama.cpp's tools first")
        if not self.model.is_file():
            raise ToolError(f"{self.model}: no such file")
        try:
            for attempt in range(PORT_ATTEMPTS):
                self._spawn(free_port())
                if self._wait_healthy(may_retry=attempt < PORT_ATTEMPTS - 1):
                    return self
                self.stop()
            raise ToolError(f"{SERVER_BINARY}: no free port on {HOST} after {PORT_ATTEMPTS} attempts")
        except BaseException:  # also KeyboardInterrupt while waiting: leave nothing running
            self.stop()
            raise

    def _spawn(self, port: int) -> None:
        self._log = tempfile.TemporaryFile(prefix="llama-server-", suffix=".log")
        self.port = port
        try:
            self._proc = subprocess.Popen(
                self.command(port), stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT
            )
        except OSError as e:
            raise ToolError(f"{self.binary}: cannot start: {e.strerror}") from None
        # a server started but never stopped (no `with`, no stop()) is killed at exit or GC
        self._reaper = weakref.finalize(self, _kill, self._proc)

    def _wait_healthy(self, may_retry: bool) -> bool:
        """True once /health says ok; False if the port was taken and `may_retry`; else raises."""
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            code = self._proc.poll()
            if code is not None:
                log = self.log_tail()
                if may_retry and BIND_FAILURE in log:
                    return False
                raise ToolError(f"{SERVER_BINARY} exited with status {code} while loading {self.model.name}:\n{log}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=HEALTH_POLL_TIMEOUT) as resp:
                    if resp.status == 200 and self._proc.poll() is None:
                        return True
            except (OSError, http.client.HTTPException):
                pass  # not listening yet, or 503 (an HTTPError) while the model loads
            time.sleep(0.05)
        raise ToolError(
            f"{SERVER_BINARY} did not become healthy within {self.startup_timeout:g} s for {self.model.name}:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL after `stop_timeout`) and drop its log; safe to call twice."""
        proc, self._proc = self._proc, None
        if self._reaper is not None:
            self._reaper.detach()
            self._reaper = None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                _kill(proc)
            except BaseException:  # Ctrl-C while waiting: do not leave it behind
                _kill(proc)
                raise
        if self._log is not None:
            self._log.close()
            self._log = None
        self.port = None

    def log_tail(self, n_bytes: int = LOG_TAIL_BYTES) -> str:
        """The end of the server's combined stdout/stderr so far."""
        if self._log is None:
            return ""
        self._log.flush()
        size = self._log.seek(0, 2)
        self._log.seek(max(0, size - n_bytes))
        return self._log.read().decode("utf-8", "replace")

    def __enter__(self) -> LlamaServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # requests
    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One JSON request; returns the decoded JSON answer or raises ToolError."""
        return request_json(
            self.url, method, path, body, self.request_timeout, model_name=self.model.name, log_tail=self.log_tail
        )

    def completion(
        self,
        prompt: str | Sequence[int],
        *,
        n_predict: int = 1,
        n_probs: int = 0,
        temperature: float = 0.0,
        **params: Any,
    ) -> dict[str, Any]:
        """POST /completion; `prompt` is text or a list of token ids (no BOS is added for ids
        unless the model's tokenizer adds one). Extra `params` go into the request as given.
        Returns the server's JSON answer unchanged."""
        body: dict[str, Any] = {
            "prompt": prompt if isinstance(prompt, str) else [int(t) for t in prompt],
            "n_predict": n_predict,
            "n_probs": n_probs,
            "temperature": temperature,
        }
        body.update(params)
        return self.request("POST", "/completion", body)

    def next_token_probs(self, tokens: Sequence[int], n_probs: int = 10) -> tuple[TokenProb, ...]:
        """The `n_probs` most likely tokens to follow `tokens`, most likely first.

        Probabilities are the softmax of the model's raw logits over the whole vocabulary
        (the server's pre-sampling probabilities), so they do not depend on sampler settings.
        """
        # The server withholds the probabilities of a sampled token that ends inside a UTF-8
        # character (byte tokens); a huge bias on the tokens of "a" makes the sampled token
        # plain ASCII. Biases act on the sampler's copy of the logits, not on the reported ones.
        answer = self.completion(
            tokens,
            n_predict=1,
            n_probs=n_probs,
            cache_prompt=False,
            post_sampling_probs=False,
            logit_bias=[["a", ANCHOR_BIAS]],
        )
        try:
            first = answer["completion_probabilities"][0]
            return tuple(
                TokenProb(
                    int(p["id"]), p.get("token", ""), float("-inf") if p["logprob"] is None else float(p["logprob"])
                )
                for p in first["top_logprobs"]
            )
        except (KeyError, IndexError, TypeError) as e:
            raise ToolError(
                f"{SERVER_BINARY} /completion for {self.model.name}: unexpected answer (no {e}): {str(answer)[:500]}"
            ) from None

    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        """Token ids of `text` under the model's tokenizer (POST /tokenize)."""
        return [
            int(t) for t in self.request("POST", "/tokenize", {"content": text, "add_special": add_special})["tokens"]
        ]
