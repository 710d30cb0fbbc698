"""A token answer leaves MicroPython's table of interned names as it was.

On MicroPython ``text[i]``, iterating a str and ``min``/``max`` over one make one-character strings,
and each distinct character is interned as a name for good. A token answer carries about 64
distinct characters. On a ROMFS board (bytecode in place, every name of the image in the heap's
qstr pools) they overflowed the last pool, and the next one is allocated at twice its size: 640
entries, 7 KB of a 64-bit heap, on the first token (benchmarks/firmware_size.py measured the
smallest ROMFS heap fall from 75K to 59K without it). The token path reads bytes instead; this
test counts the interned names around it on the ROMFS build, reading the modules from the image.
"""

import base64
import json
import re
import subprocess

ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def run_on_romfs(deployments, tmp_path, program):
    """Run `program` as main.py on the ROMFS 64-bit build (the modules read from the image); (stdout, the
    interned-name counts of its two `micropython.qstr_info()` calls)."""
    deploy = deployments("romfs-64")
    board = deploy.board_dir(tmp_path / "board", tmp_path, {})
    (board / "main.py").write_text(program)
    env = {"MICROPYPATH": ".frozen", **deploy.env()}
    done = subprocess.run(deploy.argv(deploy.heapsize), cwd=board, env=env, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    before, after = (int(n) for n in re.findall(r"n_qstr=(\d+)", done.stdout))
    return done.stdout, before, after


def test_a_token_answer_interns_no_name_on_a_romfs_board(deployments, tmp_path):
    token = ".".join((b64url(json.dumps({"alg": "RS256", "typ": "JWT"}).encode()),
                      b64url(json.dumps({"iat": 1700000000, "exp": 1700003600, "sub": "dev1"}).encode()),
                      ALPHABET * 5 + "AA"))
    out, before, after = run_on_romfs(deployments, tmp_path, (
        "import micropython\n"
        "from agent.core import jwt, smartrest\n"
        f"LINE = '71,{token}'\n"
        "print(smartrest.__file__)\n"
        "micropython.qstr_info()\n"
        "claims = jwt.decode_claims(smartrest.parse_token(LINE))\n"
        "micropython.qstr_info()\n"
        "print('exp', claims['exp'])\n"))
    assert out.startswith("/rom/agent/core/smartrest.mpy"), out
    assert "exp 1700003600" in out
    assert after == before, f"the token answer interned {after - before} names"


# Answers a publisher on the token topic could send, each refused, none with a character the
# firmware's own names hold: the characters of a field with non-ASCII text (scanned for controls
# and bidi marks), of a token that is not base64url, and the character after a closing quote.
# Before the token path read bytes, each distinct character here became a name for good: up to a
# 16,384-character line per answer, a leak any publisher on the topic could drive.
FOREIGN = "".join(chr(c) for c in range(0x3b1, 0x3c9)) + "".join(chr(c) for c in range(0x430, 0x44f))
REFUSED = (
    "71,ab" + FOREIGN + "\\u202e",                   # non-ASCII field, a bidi mark at its end
    "71,ab" + FOREIGN + "\\u0085",                   # ... a C1 control at its end
    "71,ab" + FOREIGN,                               # passes the field check, not base64url
    "71,eyJhbGciOiJSUzI1NiJ9.e30." + FOREIGN,        # the signature not base64url
    "71,\"tok\"\\u00e9" + FOREIGN,                   # text after a closing quote
)


def test_refused_non_ascii_answers_intern_no_name_on_a_romfs_board(deployments, tmp_path):
    out, before, after = run_on_romfs(deployments, tmp_path, (
        "import micropython\n"
        "from agent.core import jwt, smartrest\n"
        "from agent.core.errors import CoreError\n"
        f"FOREIGN = {FOREIGN!r}\n"
        f"ANSWERS = ({', '.join(repr(a).replace(chr(92) * 2, chr(92)) for a in REFUSED)},)\n"
        "def refuse(answer):\n"
        "    try:\n"
        "        for line in smartrest.split_lines(answer.encode()):\n"
        "            jwt.decode_claims(smartrest.parse_token(line))\n"
        "    except CoreError as exc:\n"
        "        return exc\n"
        "# one refusal first: an error path's own names (its message's format) are not the answer's\n"
        "print('warm', refuse('71,ab\\u00e9'))\n"
        "micropython.qstr_info()\n"
        "for answer in ANSWERS:\n"
        "    print('refused', refuse(answer))\n"
        "micropython.qstr_info()\n"))
    refusals = [line for line in out.splitlines() if line.startswith("refused ")]
    assert len(refusals) == len(REFUSED) and "None" not in " ".join(refusals), out
    assert after == before, f"the refused answers interned {after - before} names:\n{out}"
