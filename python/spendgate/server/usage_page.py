"""The customer's usage page: a whole document for one customer, opened by a signed link
(spendgate.service.usage_links).

    GET  /usage/{customer_id}?scope=&ceiling=&exp=&sig=           the dashboard (usage_view), numbers first
    POST /usage/{customer_id}/stop-at                             the stop-at form (a link with scope "limit")

Light and server-rendered: no script, one stylesheet of its own plus the dashboard's, an inline SVG chart. It shows
nothing of the operator's (no Stripe ids, no other customers, no navigation), and it can sit in an iframe of the app
(usage_page_frame_ancestors).
"""

from __future__ import annotations

import base64
import hashlib
import time
from typing import Final

from spendgate.display import DisplayUnit
from spendgate.server import usage_view
from spendgate.server.usage_view import Dashboard, esc
from spendgate.service.usage_links import LinkGrant, UsageLinkSigner, usage_path

STYLE: Final[str] = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
main{max-width:820px;margin:0 auto;padding:18px 16px}
.top{display:flex;justify-content:space-between;align-items:baseline;margin:0 0 12px}
.top h1{font-size:1.25rem;margin:0}.top .who{color:#5b6475;font-size:.9rem}
footer{max-width:820px;margin:0 auto;padding:0 16px 18px;font-size:.8rem;color:#5b6475}
"""
STYLE_CSP_SOURCE: Final[str] = "'sha256-" + base64.b64encode(hashlib.sha256(STYLE.encode()).digest()).decode() + "'"
TITLE: Final[str] = "Usage"


def document(title: str, body: str, footer: str = "") -> str:
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1"><meta name="robots" content="noindex">'
        f"<title>{esc(title)}</title><style>{STYLE}</style><style>{usage_view.STYLE}</style></head><body>"
        f'<main class="dash">{body}</main>' + (f"<footer>{footer}</footer>" if footer else "") + "</body></html>"
    )


def usage_page(
    board: Dashboard,
    unit: DisplayUnit,
    grant: LinkGrant,
    signer: UsageLinkSigner,
    *,
    notice: str = "",
    problem: str = "",
) -> str:
    """The dashboard of the link's customer; with a `limit` link, the stop-at form. `notice` (done) or `problem`
    (refused) is shown above it, as plain text."""
    banner = ""
    if problem:
        banner = f'<p class="notice bad" role="alert">{esc(problem)}</p>'
    elif notice:
        banner = f'<p class="notice" role="status">{esc(notice)}</p>'
    control = stop_at_form(board, unit, grant, signer) if grant.allows_limit else ""
    body = (
        f'<div class="top"><h1>{esc(TITLE)}</h1><div class="who">{esc(board.customer_id)}</div></div>{banner}'
        + usage_view.dashboard_sections(board, unit)
        + usage_view.limit_section(board, unit, control=control)
    )
    valid = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(grant.expires_at_s))
    return document(f"{TITLE} - {board.customer_id}", body, f"Figures as of now; this link works until {esc(valid)}.")


def stop_at_form(board: Dashboard, unit: DisplayUnit, grant: LinkGrant, signer: UsageLinkSigner) -> str:
    """Set the customer's own stop-at up to the link's ceiling, or remove it. The link's signed parameters travel as
    hidden fields: the form is exactly as powerful as the link, and a page elsewhere cannot forge it without one."""
    hidden = "".join(
        f'<input type="hidden" name="{esc(name)}" value="{esc(value)}">' for name, value in signer.params(grant).items()
    )
    current = unit.to_input(board.stop_at) if board.stop_at else ""
    remove = (
        '<button type="submit" name="action" value="remove" formnovalidate>Remove my stop-at</button>'
        if board.stop_at
        else ""
    )
    prefix = f"{esc(unit.prefix)} " if unit.prefix else ""
    suffix = f" {esc(unit.suffix.strip())}" if unit.suffix else ""
    return (
        f'<form method="post" action="{esc(usage_path(grant.customer_id))}/stop-at">{hidden}'
        f'<label for="stop_at"><strong>Stop my usage at</strong></label> {prefix}'
        f'<input type="number" id="stop_at" name="stop_at" min="{unit.input_step}" step="{unit.input_step}" '
        f'max="{esc(unit.to_input(grant.ceiling))}" value="{esc(current)}" required>{suffix} '
        f'<button type="submit" name="action" value="set">Save</button> {remove}'
        f'<p class="note">You can set up to {esc(unit.format(grant.ceiling))}. Usage stops at whichever is lower: your '
        f"stop-at or the limit of {esc(unit.format(board.limit))} set by your provider. Calls past it are refused "
        "until the next period or until you raise it.</p></form>"
    )


def refused_page(message: str) -> str:
    """A link that opens nothing: says why in words, shows no figure."""
    body = f'<div class="top"><h1>{esc(TITLE)}</h1></div><p class="notice bad" role="alert">{esc(message)}</p>'
    return document(TITLE, body)
