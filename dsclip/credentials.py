"""Credentials that data URLs and pipe: commands carry (a presigned link's signature, a user's
password, a bearer token), replaced by <redacted> wherever dsclip writes or logs them: the
config in the run folder, the train state, the trackers, shard errors. Imports nothing."""
import re

_SECRET = r"(?:token|key|secret|password)"  # what a secret's name contains
_SECRET_HEADER = rf"(?:authorization|cookie|[\w-]*{_SECRET})"
# (pattern, replacement), applied in order.
CREDENTIALS = [
    (re.compile(r"(\w+://)[^/\s@'\"]+@"), r"\1<redacted>@"),  # user:password@host, token@host
    (re.compile(r"(\w+://[^\s?'\"]+)\?[^\s'\"]*"), r"\1?<redacted>"),  # query strings: presigned links, tokens
    (re.compile(rf"((?:-H|--header)[=\s]*(['\"])\s*{_SECRET_HEADER}\s*:)[^'\"]*", re.IGNORECASE),
     r"\1 <redacted>"),  # curl -H 'Authorization: Bearer ...', wget --header="..."
    (re.compile(rf"((?:-H|--header)[=\s]*{_SECRET_HEADER}\s*:)\S*", re.IGNORECASE), r"\1<redacted>"),  # unquoted
    (re.compile(r"((?:^|\s)(?:-u\s*|--user[=\s]+))[^\s:'\"]+:\S+"), r"\1<redacted>"),  # curl -u user:password
    (re.compile(r"((?:^|\s)--(?:token|password|api-key|oauth2-bearer)[=\s]+)\S+"), r"\1<redacted>"),
    (re.compile(rf"(\b\w*{_SECRET}\w*=)('[^']*'|\"[^\"]*\"|\S+)", re.IGNORECASE),
     r"\1<redacted>"),  # AWS_SECRET_ACCESS_KEY=... cmd, api_key=...
]


def redact(text: str) -> str:
    """`text` with the credentials of CREDENTIALS replaced by <redacted>."""
    for pattern, replacement in CREDENTIALS:
        text = pattern.sub(replacement, text)
    return text
