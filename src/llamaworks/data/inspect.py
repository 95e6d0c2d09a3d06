"""`llamaworks data inspect FILE...` (and `finetune --preview`): what training would see, before any training.

Per file: the format and encoding read, messages or records, and for chat exports the messages per speaker and
which speakers are the persona. Then what was dropped and why (media placeholders by kind, empty messages,
unanswered turns, duplicate conversations from overlapping exports, malformed lines), what was scrubbed, and
the first conversations as they will be trained. With a tokenizer: token counts, conversations split into
windows of whole turns, and what --seq-len still cuts.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .instruct import DataReport, load_conversations, load_sft_dataset, report_bad
from .kakaotalk import is_kakao_text, read_kakao
from .records import BadRecord, Conversation


def _clip(text: str, width: int = 160) -> str:
    one = text.replace("\n", " / ")
    return one if len(one) <= width else one[:width - 1] + "…"


def format_report(report: DataReport, conversations: Sequence[Conversation], *, dataset: Any = None,
                  bad: Sequence[BadRecord] = (), show: int = 3, dropped_lines: int = 10) -> str:
    out: list[str] = []
    for f in report.files:
        out.append(f"{f.path}: {f.format}, {f.encoding}, {f.records} "
                   f"{'message(s)' if f.format.startswith('kakaotalk') else 'record(s)'} -> "
                   f"{f.conversations} conversation(s)")
        if f.speakers:
            persona = set(f.persona)
            for name, n in f.speakers.most_common():
                out.append(f"  {name}: {n} message(s){'  <- persona (assistant)' if name in persona else ''}")
        if f.events:
            out.append(f"  {f.events} room event line(s) skipped (joins, leaves, invitations)")
    out.append(report.summary())
    if dataset is not None:
        out.append(f"  {dataset.n_tokens} tokens, {dataset.n_loss_tokens} of them learned (the replies)")
    if bad:
        out.append(f"malformed ({len(bad)}):\n{report_bad(bad)}")
    if report.kakao.examples and dropped_lines:
        out.append("dropped messages (first ones):")
        for file, line, reason, text in report.kakao.examples[:dropped_lines]:
            out.append(f"  {file}:{line}: {reason}: {_clip(text, 80)!r}")
    for i, conv in enumerate(conversations[:show]):
        out.append(f"--- conversation {i + 1} of {len(conversations)} ({conv.file}:{conv.line}) ---")
        for m in conv.messages:
            out.append(f"{m['role']:>9}: {_clip(m['content'])}")
    return "\n".join(out)


def inspect_data(paths: Sequence[str | Path], *, kakao_assistant: str | Sequence[str] | None = None,
                 kakao_gap_minutes: float = 360.0, scrub: str | None = None, scrub_names: Sequence[str] = (),
                 tokenizer: Any = None, seq_len: int | None = None, chat_template: str | None = None,
                 system: str | None = None, show: int = 3) -> str:
    """The report as text. Without a persona, chat exports show only how they were read and who speaks."""
    if not kakao_assistant:
        chats = [p for p in map(Path, paths) if p.is_file() and p.suffix.lower() in (".txt", ".csv")
                 and is_kakao_text(p)]
        if chats:
            out = []
            for p in chats:
                export = read_kakao(p)
                out.append(f"{p}: kakaotalk {export.format}, {export.encoding}, {len(export.messages)} message(s)"
                           f", {export.events} room event line(s) skipped")
                out += [f"  {name}: {n} message(s)" for name, n in export.speakers.most_common()]
                if export.bad:
                    out.append(report_bad(export.bad))
            out.append("name the persona (yourself) with --kakao-assistant NAME (aliases: 'NAME1,NAME2') to see "
                       "the conversations, what is dropped and what is scrubbed")
            return "\n".join(out)
    if tokenizer is not None:
        from ..chat_template import template_for
        from .prepare import resolve_tokenizer

        tok = resolve_tokenizer(tokenizer)
        ds = load_sft_dataset(paths, tok, template=template_for(tok, chat_template), skip_bad=True,
                              max_seq_len=seq_len, kakao_assistant=kakao_assistant, system=system,
                              kakao_gap_minutes=kakao_gap_minutes, scrub=scrub, scrub_names=scrub_names)
        return format_report(ds.report, ds.parsed, dataset=ds, bad=ds.bad, show=show)
    report = DataReport()
    conversations, bad = load_conversations(paths, kakao_assistant=kakao_assistant, system=system,
                                            kakao_gap_minutes=kakao_gap_minutes, scrub=scrub,
                                            scrub_names=scrub_names, report=report)
    return format_report(report, conversations, bad=bad, show=show)


def inspect_main(**kwargs: Any) -> int:
    print(inspect_data(**kwargs))
    return 0
