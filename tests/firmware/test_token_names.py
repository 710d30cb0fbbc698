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


def test_a_token_answer_interns_no_name_on_a_romfs_board(deployments, tmp_path):
    deploy = deployments("romfs-64")
    token = ".".join((b64url(json.dumps({"alg": "RS256", "typ": "JWT"}).encode()),
                      b64url(json.dumps({"iat": 1700000000, "exp": 1700003600, "sub": "dev1"}).encode()),
                      ALPHABET * 5 + "AA"))
    board = deploy.board_dir(tmp_path / "board", tmp_path, {})
    (board / "main.py").write_text(
        "import micropython\n"
        "from agent.core import jwt, smartrest\n"
        f"LINE = '71,{token}'\n"
        "print(smartrest.__file__)\n"
        "micropython.qstr_info()\n"
        "claims = jwt.decode_claims(smartrest.parse_token(LINE))\n"
        "micropython.qstr_info()\n"
        "print('exp', claims['exp'])\n")
    env = {"MICROPYPATH": ".frozen", **deploy.env()}
    done = subprocess.run(deploy.argv(deploy.heapsize), cwd=board, env=env, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("/rom/agent/core/smartrest.mpy"), done.stdout
    assert "exp 1700003600" in done.stdout
    before, after = (int(n) for n in re.findall(r"n_qstr=(\d+)", done.stdout))
    assert after == before, f"the token answer interned {after - before} names"
