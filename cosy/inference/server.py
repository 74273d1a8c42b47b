"""`cosy serve`: one loaded system behind an HTTP server (standard library only).

    cosy serve [--model-dir DIR] [--voices DATA_DIR] [--host 127.0.0.1] [--port 8000]

    GET  /health       {"status": "ok", "sample_rate": ..., "voices": [names]}
    POST /synthesize   JSON {"text": ..., one of "voice": NAME or "prompt_wav": BASE64 audio
                       file [+ "prompt_text"], "speed": 1.0, "seed": null, "stream": false}
        -> a 16-bit PCM WAV; with "stream": true, the same samples without the header,
           sent in HTTP chunks as synthesis makes them (rate in the X-Sample-Rate header).

Bad requests get status 400 and {"error": message naming the field}. The recordings of
`--voices` (a data dir; each transcript prefixes the LM, as `prompt_text` does) are
analysed once at start, so a request that names one skips the prompt's tokenizer and
speaker encoder.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import json
import logging
import threading
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cosy.audio import encode_audio, load_audio
from cosy.errors import CosyError
from cosy.inference.pipeline import CosyTTS, Prompt

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 << 20  # a 30 s prompt as base64 float WAV is under 15 MiB
MAX_TEXT_CHARS = 5000  # syntheses run one at a time: one long text would hold every other client
FIELDS = {"text", "voice", "prompt_wav", "prompt_text", "speed", "seed", "stream"}
SOCKET_TIMEOUT_S = 60  # a client that stops reading a stream must not hold the model for ever


@dataclass
class SynthesisRequest:
    text: str
    voice: str | None        # a name from --voices, or None: prompt_audio is the prompt
    prompt_audio: bytes       # the decoded prompt_wav file
    prompt_text: str | None
    speed: float
    seed: int | None
    stream: bool


def parse_request(body: bytes) -> SynthesisRequest:
    """The JSON body of POST /synthesize -> a request; CosyError naming the bad field.
    Pure checks, so a bad request is answered without waiting for the model."""
    try:
        fields = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CosyError(f"the body is not JSON: {err}") from err
    if not isinstance(fields, dict):
        raise CosyError("the body must be a JSON object")
    unknown = sorted(set(fields) - FIELDS)
    if unknown:
        raise CosyError(f"unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(FIELDS))}")

    def typed(name: str, kinds: tuple, wanted: str, default=None):
        value = fields.get(name, default)
        # bool is an int to Python, never a number or a seed to a client
        if value is not None and (isinstance(value, bool) != (bool in kinds) or not isinstance(value, kinds)):
            raise CosyError(f"{name}: {wanted} is required, got {value!r}")
        return value

    text = typed("text", (str,), "a non-empty string")
    if not text or not text.strip():
        raise CosyError("text: a non-empty string is required")
    if len(text) > MAX_TEXT_CHARS:
        raise CosyError(f"text: at most {MAX_TEXT_CHARS} characters per request, got {len(text)}; "
                        "send a long text in several requests")
    speed = typed("speed", (int, float), "a number", 1.0)
    if not 0.25 <= speed <= 4.0:
        raise CosyError(f"speed: must be between 0.25 and 4, got {speed!r}")
    seed = typed("seed", (int,), "an integer or null")
    if seed is not None and not 0 <= seed < 2**63:
        raise CosyError(f"seed: must be between 0 and 2**63 - 1, got {seed}")
    stream = typed("stream", (bool,), "true or false", False)
    voice = typed("voice", (str,), "a voice name (GET /health lists them)")
    prompt_wav = typed("prompt_wav", (str,), "a base64 audio file")
    prompt_text = typed("prompt_text", (str,), "a string")
    if (voice is None) == (prompt_wav is None):
        raise CosyError("give exactly one of voice (a name from GET /health) and prompt_wav (a base64 audio file)")
    if voice is not None and prompt_text is not None:
        raise CosyError("prompt_text goes with prompt_wav; a voice carries its own transcript")
    try:
        audio = b"" if prompt_wav is None else base64.b64decode(prompt_wav, validate=True)
    except binascii.Error as err:
        raise CosyError(f"prompt_wav: not base64: {err}") from err
    return SynthesisRequest(text, voice, audio, prompt_text, float(speed), seed, stream)


class TTSServer(ThreadingHTTPServer):
    """Serves one `CosyTTS`. Syntheses run one at a time: each already uses every core or
    the GPU, so two at once would only slow both. Health checks answer meanwhile."""

    def __init__(self, address: tuple[str, int], tts: CosyTTS, voices: dict[str, Prompt]):
        super().__init__(address, Handler)
        self.tts, self.voices = tts, voices
        self.synthesis_lock = threading.Lock()

    def prompt_of(self, request: SynthesisRequest) -> Prompt:
        if request.voice is None:
            try:
                return self.tts.prompt(load_audio(request.prompt_audio), request.prompt_text)
            except CosyError as err:
                raise CosyError(f"prompt_wav: {err}") from err
        if request.voice not in self.voices:
            raise CosyError(f"voice: unknown voice {request.voice!r}; this server has: "
                            f"{', '.join(sorted(self.voices)) or 'none (start it with --voices DATA_DIR)'}")
        return self.voices[request.voice]


class Handler(BaseHTTPRequestHandler):
    server: TTSServer
    protocol_version = "HTTP/1.1"  # keep-alive, and chunked replies for streaming
    timeout = SOCKET_TIMEOUT_S

    def do_GET(self) -> None:
        if self.path != "/health":
            return self._error(HTTPStatus.NOT_FOUND, f"no such path {self.path}; try GET /health or POST /synthesize")
        self._send(HTTPStatus.OK, "application/json", json.dumps(
            {"status": "ok", "sample_rate": self.server.tts.sample_rate, "voices": sorted(self.server.voices)}).encode())

    def do_POST(self) -> None:
        body = self._read_body()  # first: a body left unread would be taken for the next request
        if body is None:
            return
        if self.path != "/synthesize":
            return self._error(HTTPStatus.NOT_FOUND, f"no such path {self.path}; try POST /synthesize")
        try:
            request = parse_request(body)
        except CosyError as err:
            return self._error(HTTPStatus.BAD_REQUEST, str(err))
        with self.server.synthesis_lock:
            wav = self._synthesize(request)
        if wav is not None:  # sent after the lock is released: a slow reader must not hold the model
            self._send(HTTPStatus.OK, "audio/wav", wav)

    def handle_expect_100(self) -> bool:
        """Refuse an oversized body before the client sends it."""
        length = self._body_length()
        if length > MAX_BODY_BYTES:
            self._refuse_body(length)
            return False
        return super().handle_expect_100()

    def _body_length(self) -> int:
        """Content-Length, or -1 where it is missing with a body coming, or malformed."""
        if "Transfer-Encoding" in self.headers:
            return -1
        try:
            return int(self.headers.get("Content-Length", 0))
        except ValueError:
            return -1

    def _read_body(self) -> bytes | None:
        length = self._body_length()
        if length < 0 or length > MAX_BODY_BYTES:
            self._refuse_body(length)
            return None
        return self.rfile.read(length)

    def _refuse_body(self, length: int) -> None:
        if length < 0:
            self._error(HTTPStatus.LENGTH_REQUIRED, "send the body with a Content-Length (no chunked uploads)",
                        close=True)
        else:
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                        f"the body has {length} bytes; at most {MAX_BODY_BYTES} are taken", close=True)

    def _synthesize(self, request: SynthesisRequest) -> bytes | None:
        """Answer one request, or return the WAV file for the caller to send once it has
        released the synthesis lock, which it holds."""
        tts = self.server.tts
        try:
            prompt = self.server.prompt_of(request)
            if request.stream:
                # An iterator: bad text raises here, before the 200 goes out.
                chunks = tts.stream(request.text, prompt, None, request.speed, request.seed)
            else:
                wave, rate = tts.synthesize(request.text, prompt, None, request.speed, request.seed)
        except CosyError as err:
            return self._error(HTTPStatus.BAD_REQUEST, str(err))
        except Exception as err:  # the server goes on; the client learns what happened
            log.exception("synthesis failed")
            return self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"synthesis failed: {err!r}")
        if not request.stream:
            return encode_audio(wave, rate)
        # Closed here, under the lock: closing restores the global RNG state that a seeded
        # stream saved, which must not land in the next request's synthesis.
        with contextlib.closing(chunks):
            self._stream(chunks, tts.sample_rate)

    def _stream(self, chunks, rate: int) -> None:
        chunked = self.request_version != "HTTP/1.0"  # HTTP/1.0 has no chunks: send, then close
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("X-Sample-Rate", str(rate))
        self.send_header("X-Sample-Format", "s16le")
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Connection", "close")
        self.end_headers()
        try:
            for chunk in chunks:
                data = encode_audio(chunk, rate, "RAW")
                if data:  # an empty chunk would end a chunked body
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
        except OSError as err:  # the client hung up or stopped reading: stop synthesising for it
            self.close_connection = True
            log.info("%s: stream ended early: %s", self.address_string(), err)
        except Exception:  # the headers are out: an unfinished body is all the client can be told
            self.close_connection = True
            log.exception("synthesis failed during a stream")

    def _error(self, status: HTTPStatus, message: str, close: bool = False) -> None:
        log.info("%s %s -> %d: %s", self.command, self.path, status, message)
        self._send(status, "application/json", json.dumps({"error": message}).encode(), close)

    def _send(self, status: HTTPStatus, kind: str, data: bytes, close: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        if close:
            self.send_header("Connection", "close")  # also sets close_connection
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:
        log.info("%s %s", self.address_string(), format % args)


def load_voices(tts: CosyTTS, data_dir: str) -> dict[str, Prompt]:
    """Name (utterance id) -> analysed prompt with its transcript, for every recording of
    a data dir."""
    from cosy.data.kaldi import DataDir

    data = DataDir.load(data_dir)
    voices = {}
    for utt in data.utts:
        try:
            voices[utt] = tts.prompt(data.wav[utt], data.text[utt])
        except CosyError as err:
            raise CosyError(f"--voices {data_dir}: utterance {utt}: {err}") from err
    return voices


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-dir", help="model dir made by `cosy pack` (default: the installed model)")
    parser.add_argument("--voices", help="data dir whose recordings become named voices (name = utterance id)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free one)")
    parser.add_argument("--flow-steps", type=int, help="flow decoder solver steps (default: the model dir's)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        raise CosyError(f"--port must be between 0 and 65535, got {args.port}")
    if args.flow_steps is not None and args.flow_steps < 1:
        raise CosyError(f"--flow-steps must be at least 1, got {args.flow_steps}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    tts = CosyTTS.from_pretrained(args.model_dir, args.device)
    if args.flow_steps is not None:
        tts.set_flow_steps(args.flow_steps)
    voices = load_voices(tts, args.voices) if args.voices else {}
    try:
        server = TTSServer((args.host, args.port), tts, voices)
    except OSError as err:
        raise CosyError(f"cannot listen on {args.host}:{args.port}: {err}") from err
    host, port = server.server_address[:2]
    log.info("serving %d voice(s) on http://%s:%d (POST /synthesize, GET /health); Ctrl-C stops",
             len(voices), host, port)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
