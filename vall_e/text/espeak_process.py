"""espeak-ng phonemization in a child process, so a text that crashes the library cannot take the caller down.

Why: some texts make espeak-ng itself crash (a segfault: the Portuguese voice on "© worker", per
espeak-ng's tracker Greek letters in Portuguese and French text, some Hindi and Farsi strings). In
process, that ends the program with "Segmentation fault" and no word of which text did it: a g2p run
over a dataset dies at its first such transcript, a server at its first such request. Here one child
process (`python -m vall_e.text.espeak_process`, started on the first call, ~0.2 s) holds the
phonemizer backends; a crash ends only the child. The caller gets `EspeakCrashed`, the next call starts
a new child, and `vall_e.text.phonemes` retries a crashed batch chunk by chunk to name the text.

The protocol is one JSON line each way: {"code": espeak language code, "chunks": [text, ...],
"profile": "vall_e" | "amphion"} -> {"out": [ipa, ...]} or {"error": message, "kind": "language" |
"profile" | "phonemize"}. A profile is a set of phonemizer options: this project's (stress kept,
language switches removed) or Amphion VALL-E's (no stress, switches kept, phones separated by '|' and
words by '_'), so published Amphion checkpoints get their own phones from the same crash-proof child.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

from vall_e.utils.errors import UserError

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # the folder holding `vall_e`


class EspeakCrashed(RuntimeError):
    """The child process died while phonemizing (espeak-ng crashed on the text); `returncode` says how."""

    def __init__(self, returncode: int | None) -> None:
        super().__init__(f"espeak-ng crashed (child process exit {returncode})")
        self.returncode = returncode


class PhonemizerProcess:
    """A child process that phonemizes; restarted on the next call after it dies. Not thread-safe:
    callers hold a lock (espeak-ng itself is not thread-safe either)."""

    def __init__(self, argv: Sequence[str] | None = None) -> None:
        self.argv = list(argv) if argv else [sys.executable, "-m", "vall_e.text.espeak_process"]
        self._proc: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p)
        env["PYTHONIOENCODING"] = "utf-8"
        return subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                env=env, text=True, encoding="utf-8", bufsize=1)

    def phonemize(self, code: str, chunks: Sequence[str], profile: str = "vall_e") -> list[str]:
        """IPA per chunk under a profile's options (`PROFILES`). Raises EspeakCrashed if the child died
        on them, UserError for what espeak-ng refused (an unknown language, a phonemizer error)."""
        if self._proc is None or self._proc.poll() is not None:
            self._proc = self._start()
        proc = self._proc
        try:
            proc.stdin.write(json.dumps({"code": code, "chunks": list(chunks), "profile": profile}) + "\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:  # the child is gone
            self._proc = None
            try:
                returncode = proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                returncode = proc.wait()
            raise EspeakCrashed(returncode)
        reply = json.loads(line)
        if "error" in reply:
            raise UserError(reply["error"])
        return reply["out"]

    def close(self) -> None:
        if self._proc is not None:
            self._proc.stdin.close()  # the child's loop ends at the end of its input
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
            self._proc = None


# ---------------------------------------------------------------------------------------- the child

PROFILES = ("vall_e", "amphion")
_backends: dict[tuple[str, str], Any] = {}


def _backend(code: str, profile: str) -> Any:
    """Cached phonemizer EspeakBackend for an espeak language code and a profile's options."""
    backend = _backends.get((code, profile))
    if backend is None:
        from vall_e.text.espeak import configure_phonemizer

        configure_phonemizer()
        from phonemizer.backend import EspeakBackend
        from phonemizer.punctuation import Punctuation

        logger = logging.getLogger("vall_e.phonemizer")
        logger.setLevel(logging.ERROR)
        if profile == "amphion":
            options = dict(punctuation_marks=Punctuation.default_marks(), preserve_punctuation=True, with_stress=False,
                           tie=False, language_switch="keep-flags", words_mismatch="ignore")
        else:
            options = dict(preserve_punctuation=True, with_stress=True, language_switch="remove-flags",
                           words_mismatch="ignore", logger=logger)
        try:
            backend = EspeakBackend(code, **options)
        except RuntimeError as e:
            raise UserError(f"espeak-ng cannot phonemize language {code!r}: {e}") from None
        _backends[(code, profile)] = backend
    return backend


def _phonemize_options(profile: str) -> dict[str, Any]:
    options: dict[str, Any] = dict(strip=True, njobs=1)
    if profile == "amphion":
        from phonemizer.separator import Separator

        options["separator"] = Separator(word="_", syllable="-", phone="|")
    return options


def handle(request: dict[str, Any]) -> dict[str, Any]:
    """One request's reply (the child's work, also callable in process)."""
    code, chunks, profile = request["code"], request["chunks"], request.get("profile", "vall_e")
    if profile not in PROFILES:
        return {"error": f"unknown phonemizer profile {profile!r}: use one of {', '.join(PROFILES)}", "kind": "profile"}
    try:
        backend = _backend(code, profile)
    except UserError as e:
        return {"error": str(e), "kind": "language"}
    options = _phonemize_options(profile)
    try:
        out = backend.phonemize(chunks, **options)
        if len(out) != len(chunks):
            # phonemizer joins consecutive punctuation-only lines (["«", "«"] -> ["««"]), which would
            # misalign every text after them: then phonemize one chunk per call
            out = [(backend.phonemize([chunk], **options) or [""])[0] for chunk in chunks]
    except (RuntimeError, ValueError) as e:
        return {"error": f"espeak-ng failed to phonemize ({code}): {e}", "kind": "phonemize"}
    return {"out": out}


def serve(stdin: Any = None, stdout: Any = None) -> None:
    """The child's loop: a reply line per request line, until the input ends."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    for line in stdin:
        if line.strip():
            stdout.write(json.dumps(handle(json.loads(line))) + "\n")
            stdout.flush()


if __name__ == "__main__":
    serve()
