"""The few bodies the tracker answers with: the pixel, the unsubscribe pages, the errors."""

from __future__ import annotations

# A 1x1 transparent GIF (GIF89a, one colour, transparent index 0): 43 bytes.
PIXEL_GIF = (b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff"
             b"!\xf9\x04\x01\x00\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00"
             b"\x00\x02\x02D\x01\x00;")

NOT_FOUND = b"Not Found\n"
METHOD_NOT_ALLOWED = b"Method Not Allowed: GET, HEAD and POST only\n"
UNAVAILABLE = b"Service Unavailable: please try again in a minute\n"

_STYLE = ("body{font-family:sans-serif;max-width:32em;margin:4em auto;padding:0 1em}"
          "button{font-size:1.1em;padding:.5em 1.5em}")

# The form posts `List-Unsubscribe=One-Click` to the page's own URL (an empty
# action keeps the query string, so formats b and c work), which is exactly
# the RFC 8058 one-click request: one code path records both.
CONFIRM_PAGE = (
    "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
    "<meta name=\"robots\" content=\"noindex\">"
    "<meta name=\"viewport\" content=\"width=device-width\">"
    f"<title>Unsubscribe</title><style>{_STYLE}</style></head><body>"
    "<h1>Unsubscribe</h1><p>Do you want to stop receiving this mailing list?</p>"
    "<form method=\"post\" action=\"\">"
    "<input type=\"hidden\" name=\"List-Unsubscribe\" value=\"One-Click\">"
    "<button type=\"submit\">Unsubscribe</button></form></body></html>\n"
).encode("ascii")

DONE_PAGE = (
    "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
    "<meta name=\"robots\" content=\"noindex\">"
    "<meta name=\"viewport\" content=\"width=device-width\">"
    f"<title>Unsubscribed</title><style>{_STYLE}</style></head><body>"
    "<h1>Unsubscribed</h1><p>You will not receive this mailing list any more.</p>"
    "</body></html>\n"
).encode("ascii")
