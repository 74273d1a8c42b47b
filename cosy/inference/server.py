"""`cosy serve`: one loaded system behind an HTTP server (standard library only).

    cosy serve [--model-dir DIR] [--voices DATA_DIR] [--host 127.0.0.1] [--port 8000]

    GET  /health       {"status": "ok", "sample_rate": ..., "voices": [names]}
    POST /synthesize   JSON {"text": ..., one of "voice": NAME or "prompt_wav": BASE64 audio
                       file [+ "prompt_text"], "speed": 1.0, "seed": null, "stream": false}
        -> a 16-bit PCM WAV; with "stream": true, raw 16-bit little-endian mono PCM sent in
           HTTP chunks as synthesis makes them (rate in the X-Sample-Rate header).

Bad requests get status 400 and {"error": message naming the field}. The recordings of
`--voices` (a data dir; each transcript prefixes the LM, as `prompt_text` does) are
analysed once at start, so a request that names one skips the prompt's tokenizer and
speaker encoder.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import io
import json
import logging
import threading
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

from cosy.audio import load_audio
from cosy.errors import CosyError
from cosy.inference.pipeline import CosyTTS, Prompt

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 << 20  # a 30 s prompt as base64 float WAV is under 15 MiB
FIELDS = {"text", "voice", "prompt_wav", "prompt_text", "speed", "seed", "stream"}


@dataclass
class SynthesisRequest:
    text: str
    prompt: Prompt
    speed: float
    seed: int | None
    stream: bool


def parse_request(body: bytes, tts: CosyTTS, voices: dict[str, Prompt]) -> SynthesisRequest:
    """The JSON body of POST /synthesize -> a request; CosyError naming the bad field."""
    try:
        fields = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CosyError(f"the body is not JSON: {err}") from err
    if not isinstance(fields, dict):
        raise CosyError("the body must be a JSON object")
    unknown = sorted(set(fields) - FIELDS)
    if unknown:
        raise CosyError(f"unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(FIELDS))}")
    text = fields.get("text")
    if not isinstance(text, str) or not text.strip():
        raise CosyError("text: a non-empty string is required")
    speed, seed, stream = fields.get("speed", 1.0), fields.get("seed"), fields.get("stream", False)
    if isinstance(speed, bool) or not isinstance(speed, (int, float)):
        raise CosyError(f"speed: a number is required, got {speed!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise CosyError(f"seed: an integer or null is required, got {seed!r}")
    if not isinstance(stream, bool):
        raise CosyError(f"stream: true or false is required, got {stream!r}")
    if ("voice" in fields) == ("prompt_wav" in fields):
        raise CosyError("give exactly one of voice (a name from GET /health) and prompt_wav (a base64 audio file)")
    if "voice" in fields:
        if "prompt_text" in fields:
            raise CosyError("prompt_text goes with prompt_wav; a voice carries its own transcript")
        if not isinstance(fields["voice"], str) or fields["voice"] not in voices:
            raise CosyError(f"voice: unknown voice {fields['voice']!r}; this server has: "
                            f"{', '.join(sorted(voices)) or 'none (start it with --voices DATA_DIR)'}")
        prompt = voices[fields["voice"]]
    else:
        prompt_text = fields.get("prompt_text")
        if prompt_text is not None and not isinstance(prompt_text, str):
            raise CosyError(f"prompt_text: a string is required, got {prompt_text!r}")
        try:
            audio = base64.b64decode(str(fields["prompt_wav"]), validate=True)
        except binascii.Error as err:
            raise CosyError(f"prompt_wav: not base64: {err}") from err
        try:
            prompt = tts.prompt(load_audio(audio), prompt_text)
        except CosyError as err:
            raise CosyError(f"prompt_wav: {err}") from err
    return SynthesisRequest(text, prompt, float(speed), seed, stream)


def wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    """16-bit PCM WAV file contents."""
    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, np.clip(samples, -1.0, 1.0), rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def pcm16(samples: np.ndarray) -> bytes:
    """Raw 16-bit little-endian PCM of float samples in [-1, 1] (the streamed format)."""
    return np.round(np.clip(samples, -1.0, 1.0) * 32767).astype("<i2").tobytes()


class TTSServer(ThreadingHTTPServer):
    """Serves one `CosyTTS`; syntheses run one at a time (each already uses every core or
    the GPU, so two at once would only slow both), health checks answer meanwhile."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], tts: CosyTTS, voices: dict[str, Prompt]):
        super().__init__(address, Handler)
        self.tts, self.voices = tts, voices
        self.synthesis_lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    server: TTSServer
    protocol_version = "HTTP/1.1"  # chunked transfer for streaming

    def do_GET(self) -> None:
        if self.path != "/health":
            return self._error(HTTPStatus.NOT_FOUND, f"no such path {self.path}; try GET /health or POST /synthesize")
        self._json(HTTPStatus.OK, {"status": "ok", "sample_rate": self.server.tts.sample_rate,
                                   "voices": sorted(self.server.voices)})

    def do_POST(self) -> None:
        if self.path != "/synthesize":
            return self._error(HTTPStatus.NOT_FOUND, f"no such path {self.path}; try POST /synthesize")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            return self._error(HTTPStatus.BAD_REQUEST, "Content-Length must be a byte count")
        if length > MAX_BODY_BYTES:
            self.close_connection = True  # the unread body would be taken for the next request
            return self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                               f"the body has {length} bytes; at most {MAX_BODY_BYTES} are taken")
        body = self.rfile.read(length)
        tts = self.server.tts
        with self.server.synthesis_lock:
            try:
                request = parse_request(body, tts, self.server.voices)
                if request.stream:
                    # An iterator: bad text raises here, before the 200 goes out.
                    chunks = tts.stream(request.text, request.prompt, None, request.speed, request.seed)
                else:
                    wave, rate = tts.synthesize(request.text, request.prompt, None, request.speed, request.seed)
            except CosyError as err:
                return self._error(HTTPStatus.BAD_REQUEST, str(err))
            except Exception as err:  # the server goes on; the client learns what happened
                log.exception("synthesis failed")
                return self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"synthesis failed: {err!r}")
            if request.stream:
                return self._stream(chunks, tts.sample_rate)
        self._send(HTTPStatus.OK, "audio/wav", wav_bytes(wave, rate))

    def _stream(self, chunks, rate: int) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("X-Sample-Rate", str(rate))
        self.send_header("X-Sample-Format", "s16le")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for chunk in chunks:
                if len(chunk):
                    data = pcm16(chunk)
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                    self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        except ConnectionError:  # the client hung up: stop synthesising for it
            self.close_connection = True
            log.info("%s left before the stream ended", self.address_string())

    def _json(self, status: HTTPStatus, payload: dict) -> None:
        self._send(status, "application/json", json.dumps(payload).encode())

    def _error(self, status: HTTPStatus, message: str) -> None:
        log.info("%s %s -> %d: %s", self.command, self.path, status, message)
        self._json(status, {"error": message})

    def _send(self, status: HTTPStatus, kind: str, data: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
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
            voices[utt] = tts.prompt(data.wav[utt], data.text.get(utt))
        except CosyError as err:
            raise CosyError(f"--voices {data_dir}: utterance {utt}: {err}") from err
    return voices


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-dir", help="model dir made by `cosy pack` (default: the installed model)")
    parser.add_argument("--voices", help="data dir whose recordings become named voices (name = utterance id)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free one)")
    parser.add_argument("--flow-steps", type=int, help="flow decoder solver steps (default: the model dir's)")
    parser.add_argument("--device", default="cpu")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if not 0 <= args.port <= 65535:
        raise CosyError(f"--port must be between 0 and 65535, got {args.port}")
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
