"""``/setup``: the page a person opens to set up a mail program by hand.

It shows, for one domain, the server name and the ports that are really open, each with
its security setting in the words the common mail programs use ("SSL/TLS" and
"STARTTLS" in Thunderbird, Outlook, Thunderbird for Android/K-9 Mail; "Use TLS/SSL" in
Apple Mail), the user name (the full address) and the password kind (the normal one).

Plain HTML and CSS: no JavaScript, no external resources, readable on a phone (viewport
meta, one fluid column, tables that fit 320 px).

Invariants:
- Every value put in the page goes through ``html.escape``.
- Only open ports are listed (from ``autoconfig.endpoints``), implicit TLS first.
- With ``implicit_also`` (``[security] tls_sniff_ms > 0``: 587/143/110 answer a TLS
  ClientHello sent as the first byte), each STARTTLS row says that SSL/TLS works there too;
  the recommendation stays the implicit-TLS port (RFC 8314 §3.3).
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from urllib.parse import quote

from postkeep.web.autoconfig import Endpoint, Protocol, Security, of

#: What each program calls the security setting, and its value for each kind of port.
PROGRAM_WORDS: tuple[tuple[str, str, str, str], ...] = (
    ("Thunderbird", "Connection security", "SSL/TLS", "STARTTLS"),
    ("Outlook", "Encryption method", "SSL/TLS", "STARTTLS"),
    ("Apple Mail (Mac, iPhone, iPad)", "Use TLS/SSL", "on", "on"),
    ("Thunderbird for Android, K-9 Mail", "Security", "SSL/TLS", "STARTTLS"),
)

AUTH_WORDS = (
    "Authentication: “Normal password” (Thunderbird, K-9 Mail), “Password” (Apple "
    "Mail); in Outlook leave “Require logon using Secure Password Authentication (SPA)” "
    "off. The outgoing server needs authentication too."
)

SECURITY_WORDS = {Security.SSL: "SSL/TLS", Security.STARTTLS: "STARTTLS"}

#: Under a STARTTLS row when the listener also accepts a handshake from the first byte.
ALSO_SSL_WORDS = "SSL/TLS also works on this port"

EXPLANATION = (
    "SSL/TLS encrypts the connection from the first byte; STARTTLS connects unencrypted "
    "and switches to encryption before anything private is sent. Both are encrypted "
    "here — this server refuses passwords on an unencrypted connection — and SSL/TLS "
    "is preferred (RFC 8314). Never choose “None”."
)

CSS = """
*{box-sizing:border-box}
body{margin:0;font:16px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
color:#1a1a1a;background:#f4f5f7}
main{max-width:44rem;margin:0 auto;padding:1rem}
h1{font-size:1.45rem;margin:.4rem 0 .2rem}
h2{font-size:1.1rem;margin:0 0 .5rem}
p{margin:.4rem 0}
.lead{color:#444;margin-bottom:1rem}
section{background:#fff;border:1px solid #dde1e6;border-radius:.6rem;padding:.9rem 1rem;
margin:0 0 1rem}
table{width:100%;border-collapse:collapse}
th,td{text-align:left;padding:.45rem .4rem;border-bottom:1px solid #eceef1;
vertical-align:top}
th{font-weight:600;color:#555;font-size:.9rem}
tr:last-child td,tr:last-child th{border-bottom:0}
.scroll{overflow-x:auto}
.words th .sec{font-size:.8rem}
.setting{display:block;color:#555;font-size:.9rem}
.small{font-size:.9rem;color:#444}
.kv th{width:42%}
code,.mono{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;
font-size:.95em;overflow-wrap:anywhere}
.port{font-size:1.15rem;font-weight:600}
.sec{display:inline-block;padding:.05rem .5rem;border-radius:1rem;font-weight:600;
font-size:.95rem}
.ssl{background:#dff3e4;color:#14532d}
.starttls{background:#e3ecfb;color:#1e3a8a}
.rec{color:#14532d;font-size:.85rem;display:block}
.also{color:#444;font-size:.85rem;display:block}
.note{background:#fff8e1;border-color:#f0d98a}
.why{background:#eef4ff;border-color:#c9d8f5}
form{display:flex;flex-wrap:wrap;gap:.5rem;margin-top:.5rem}
input{flex:1 1 12rem;font:inherit;padding:.45rem .6rem;border:1px solid #b8bec7;
border-radius:.4rem;min-width:0}
button{font:inherit;padding:.45rem 1rem;border:0;border-radius:.4rem;background:#1e3a8a;
color:#fff}
footer{color:#666;font-size:.85rem;text-align:center;padding:.5rem 0 1.5rem}
"""


def _port_table(eps: Sequence[Endpoint], implicit_also: bool) -> str:
    rows = []
    for i, ep in enumerate(eps):
        cls = ep.security.value
        rec = '<span class="rec">recommended</span>' if i == 0 and len(eps) > 1 else ""
        also = (
            f'<span class="also">{escape(ALSO_SSL_WORDS)}</span>'
            if implicit_also and ep.security is Security.STARTTLS else ""
        )
        rows.append(
            f'<tr><td class="port">{ep.port}</td>'
            f'<td><span class="sec {cls}">{SECURITY_WORDS[ep.security]}</span>{rec}{also}'
            "</td></tr>"
        )
    return (
        '<table><thead><tr><th>Port</th><th>Connection security</th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _server_section(
    title: str, hostname: str, eps: Sequence[Endpoint], implicit_also: bool
) -> str:
    if not eps:
        return ""
    return (
        f"<section><h2>{escape(title)}</h2>"
        f"<p>Server: <code>{escape(hostname)}</code></p>"
        f"{_port_table(eps, implicit_also)}</section>"
    )


def _programs_table(eps: Sequence[Endpoint]) -> str:
    ssl_ports = any(e.security is Security.SSL for e in eps)
    tls_ports = any(e.security is Security.STARTTLS for e in eps)
    head = ["<th>Program: setting</th>"]
    if ssl_ports:
        head.append('<th>on <span class="sec ssl">SSL/TLS</span> ports</th>')
    if tls_ports:
        head.append('<th>on <span class="sec starttls">STARTTLS</span> ports</th>')
    rows = []
    for program, setting, on_ssl, on_starttls in PROGRAM_WORDS:
        cells = [f'<td>{escape(program)}<span class="setting">{escape(setting)}</span></td>']
        if ssl_ports:
            cells.append(f"<td><b>{escape(on_ssl)}</b></td>")
        if tls_ports:
            cells.append(f"<td><b>{escape(on_starttls)}</b></td>")
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return (
        f'<div class="scroll"><table class="words"><thead><tr>{"".join(head)}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


def render(
    *,
    hostname: str,
    domain: str,
    eps: Sequence[Endpoint],
    other_domains: Sequence[str] = (),
    self_signed_fingerprint: str | None = None,
    apple_profile: bool = True,
    implicit_also: bool = False,
) -> str:
    """The whole page, as a string of HTML."""
    h, d = escape(hostname), escape(domain)
    account = (
        '<section><h2>Your account</h2><table class="kv"><tbody>'
        f"<tr><th>Email address</th><td><code>you@{d}</code></td></tr>"
        f"<tr><th>Username</th><td>your full email address (<code>you@{d}</code>)</td></tr>"
        "<tr><th>Password</th><td>your normal mailbox password</td></tr>"
        f"<tr><th>Incoming server</th><td><code>{h}</code></td></tr>"
        f"<tr><th>Outgoing server</th><td><code>{h}</code>, with the same username "
        "and password</td></tr>"
        "</tbody></table></section>"
    )
    sections = [
        _server_section("Incoming mail: IMAP (recommended)", hostname,
                        of(eps, Protocol.IMAP), implicit_also),
        _server_section("Incoming mail: POP3", hostname, of(eps, Protocol.POP3),
                        implicit_also),
        _server_section("Outgoing mail: SMTP", hostname, of(eps, Protocol.SMTP),
                        implicit_also),
    ]
    words = (
        "<section><h2>What your program calls it</h2>"
        f"{_programs_table(eps)}<p class=\"small\">{escape(AUTH_WORDS)}</p></section>"
        if eps else ""
    )
    why = f'<section class="why"><p><b>SSL/TLS or STARTTLS?</b> {escape(EXPLANATION)}</p>' \
        "</section>"
    cert = ""
    if self_signed_fingerprint:
        cert = (
            '<section class="note"><h2>Certificate warning</h2>'
            "<p>This server uses a self-signed certificate, so your program will warn you "
            "the first time. Accept it only if the SHA-256 fingerprint it shows is:</p>"
            f'<p class="mono">{escape(self_signed_fingerprint)}</p></section>'
        )
    apple = ""
    if apple_profile and eps:
        apple = (
            "<section><h2>iPhone, iPad and Mac</h2>"
            "<p>Download a profile that sets up Apple Mail for you (it is not signed, so "
            "the device calls it “Unverified”; it asks for your password, which is not in "
            "the profile):</p>"
            '<form method="get" action="/apple/postkeep.mobileconfig">'
            '<input type="email" name="emailaddress" required '
            f'placeholder="you@{d}" aria-label="Your email address">'
            "<button>Download profile</button></form></section>"
        )
    auto = (
        "<p class=\"lead\">Thunderbird and Outlook can usually find these settings "
        "themselves: type your address and password and let them look.</p>"
    )
    others = ""
    if other_domains:
        links = ", ".join(
            f'<a href="/setup?domain={quote(o)}">{escape(o)}</a>' for o in other_domains
        )
        others = f"<p>Other domains on this server: {links}</p>"
    if not eps:
        sections = ["<section><p>No mail ports are open on this server.</p></section>"]
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>Mail settings for {d}</title><style>{CSS}</style></head><body><main>"
        f"<h1>Mail settings for {d}</h1>{auto}"
        f"{account}{''.join(sections)}{why}{words}{cert}{apple}{others}"
        f"</main><footer>Served by {h}</footer></body></html>\n"
    )
