"""The token decoder's error path in real MicroPython, where ``binascii.Error`` does not exist.

The decoder once caught ``(ValueError, binascii.Error)``: on MicroPython evaluating that tuple raises
AttributeError, so any exception inside the ``try`` (a MemoryError under heap pressure, a decoding
error) killed the board's agent (seen at 75K on the 32-bit build). No well-formed input reaches that
``except`` (the alphabet and padding are checked first), so the decoding step is replaced by one
that raises, as the heap or a future MicroPython might.
"""

from tests.firmware import micropython

SCRIPT = """
import json
from agent.core import jwt
from agent.core.errors import TokenError

class Raising:
    def __init__(self, exc):
        self.exc = exc
    def a2b_base64(self, data):
        raise self.exc

real = jwt.binascii
got = {}
for name, exc in (("value", ValueError("incorrect padding")), ("memory", MemoryError())):
    jwt.binascii = Raising(exc)
    try:
        jwt.b64url_decode("QUJD", "token.payload")
        got[name] = "returned"
    except TokenError as e:
        got[name] = "TokenError: " + str(e)
    except MemoryError:
        got[name] = "MemoryError"
    except Exception as e:
        got[name] = type(e).__name__ + ": " + str(e)
jwt.binascii = real
got["real"] = jwt.b64url_decode("QUJD", "token.payload").decode()
print("@@RESULT " + json.dumps(got))
"""


def test_an_exception_while_decoding_a_token_is_a_token_error_in_micropython():
    got = micropython.run(SCRIPT)
    assert got == {"value": "TokenError: token.payload: not base64url (incorrect padding)",
                   "memory": "MemoryError", "real": "ABC"}
