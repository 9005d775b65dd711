"""What Libra says on Discord, in English and Korean: command names, descriptions and replies.

Command names and descriptions are lightbulb localization keys (``localize=True``); Discord shows
each person the names in their client's language. Replies follow the locale an interaction
carries, or the server's preferred locale for messages.
"""

from __future__ import annotations

from collections.abc import Mapping

import hikari
import lightbulb

__all__ = ["COMMAND_TEXTS", "localization", "say"]

# key: (English, Korean)
COMMAND_TEXTS: dict[str, tuple[str, str]] = {
    "chat": ("chat", "채팅"),
    "chat.desc": (
        "Chat mode: Libra answers every message in this channel",
        "채팅 모드: 이 채널의 모든 메시지에 Libra가 답합니다",
    ),
    "chat.on": ("on", "켜기"),
    "chat.on.desc": ("Turn chat mode on in this channel", "이 채널에서 채팅 모드를 켭니다"),
    "chat.off": ("off", "끄기"),
    "chat.off.desc": ("Turn chat mode off in this channel", "이 채널에서 채팅 모드를 끕니다"),
    "reset": ("reset", "초기화"),
    "reset.desc": ("Forget my conversation memory", "내 대화 기억을 지웁니다"),
    "reset.everywhere": ("everywhere", "전체"),
    "reset.everywhere.desc": (
        "Forget what Libra remembers of me everywhere, not only here",
        "이 대화뿐 아니라 모든 곳에서 나에 대한 기억을 지웁니다",
    ),
    "model": ("model", "모델"),
    "model.desc": (
        "Show the provider and model for this server; admins set it",
        "이 서버의 제공자와 모델을 봅니다. 관리자는 바꿀 수 있습니다",
    ),
    "model.name": ("name", "이름"),
    "model.name.desc": (
        "provider:model or model, e.g. openai:gpt-4o-mini",
        "제공자:모델 또는 모델, 예: openai:gpt-4o-mini",
    ),
    "persona": ("persona", "페르소나"),
    "persona.desc": (
        "Show the system prompt for this server; admins set it",
        "이 서버의 시스템 프롬프트를 봅니다. 관리자는 바꿀 수 있습니다",
    ),
    "persona.prompt": ("prompt", "프롬프트"),
    "persona.prompt.desc": ("The new system prompt", "새 시스템 프롬프트"),
    "clear": ("clear", "기본값"),
    "clear.desc": ("Go back to Libra's default", "Libra의 기본값으로 되돌립니다"),
    "stats": ("stats", "통계"),
    "stats.desc": ("My usage today: turns and tokens", "오늘 내 사용량: 대화 수와 토큰"),
    "help": ("help", "도움말"),
    "help.desc": ("What Libra does and how to talk to it", "Libra가 하는 일과 사용법"),
    "join": ("join", "참가"),
    "join.desc": ("Libra joins your voice channel", "Libra가 내 음성 채널에 들어옵니다"),
    "leave": ("leave", "나가기"),
    "leave.desc": ("Libra leaves the voice channel", "Libra가 음성 채널에서 나갑니다"),
    "record": ("record", "녹음"),
    "record.desc": (
        "Start recording what you say in voice; /stop ends it",
        "음성으로 하는 말을 녹음하기 시작합니다. /stop으로 끝냅니다",
    ),
    "stop": ("stop", "정지"),
    "stop.desc": (
        "Stop recording: Libra answers what you said",
        "녹음을 멈추면 Libra가 녹음한 말에 답합니다",
    ),
    "voice": ("voice", "음성"),
    "voice.desc": ("How Libra listens in voice", "Libra가 음성을 듣는 방식"),
    "voice.auto": ("auto", "자동"),
    "voice.auto.desc": (
        "Libra answers when you pause (voice activity)",
        "말을 멈추면 Libra가 답합니다 (음성 감지)",
    ),
    "voice.manual": ("manual", "수동"),
    "voice.manual.desc": (
        "Libra listens only between /record and /stop",
        "/record와 /stop 사이에만 Libra가 듣습니다",
    ),
    "moderation": ("moderation", "검토"),
    "moderation.desc": (
        "What this server refuses, and where flagged messages are reported",
        "이 서버가 거절하는 내용과 신고된 메시지를 알릴 채널",
    ),
    "moderation.show": ("show", "보기"),
    "moderation.show.desc": (
        "Show this server's moderation policy",
        "이 서버의 검토 정책을 봅니다",
    ),
    "moderation.categories": ("categories", "분류"),
    "moderation.categories.desc": (
        "Admins: the categories to refuse (all, none, or a list)",
        "관리자: 거절할 분류 (all, none 또는 목록)",
    ),
    "moderation.categories.list": ("list", "목록"),
    "moderation.categories.list.desc": (
        "e.g. hate, sexual_minors, self_harm; all; none",
        "예: hate, sexual_minors, self_harm; all; none",
    ),
    "moderation.threshold": ("threshold", "기준"),
    "moderation.threshold.desc": (
        "Admins: the score at which a category is refused",
        "관리자: 분류를 거절하는 점수",
    ),
    "moderation.threshold.category": ("category", "분류"),
    "moderation.threshold.category.desc": ("The category", "분류"),
    "moderation.threshold.score": ("score", "점수"),
    "moderation.threshold.score.desc": (
        "0 to 1 (lower is stricter); leave out to use the engine's own judgement",
        "0부터 1 (낮을수록 엄격). 비우면 엔진의 판단을 따릅니다",
    ),
    "moderation.log": ("log", "기록"),
    "moderation.log.desc": (
        "Admins: the channel where flagged messages are reported",
        "관리자: 신고된 메시지를 알릴 채널",
    ),
    "moderation.log.channel": ("channel", "채널"),
    "moderation.log.channel.desc": ("A text channel of this server", "이 서버의 텍스트 채널"),
    "learn": ("learn", "학습"),
    "learn.desc": (
        "Admins: add a document (txt, md, html, pdf) to this server's knowledge base",
        "관리자: 문서(txt, md, html, pdf)를 이 서버의 지식 베이스에 추가합니다",
    ),
    "learn.file": ("file", "파일"),
    "learn.file.desc": ("The document: txt, md, html or pdf", "문서: txt, md, html 또는 pdf"),
    "learn.title": ("title", "제목"),
    "learn.title.desc": (
        "The name its sources are shown by (the file's name if left out)",
        "출처로 보일 이름 (비우면 파일 이름)",
    ),
    "knowledge": ("knowledge", "지식"),
    "knowledge.desc": (
        "Admins: the documents of this server's knowledge base",
        "관리자: 이 서버의 지식 베이스 문서",
    ),
    "knowledge.list": ("list", "목록"),
    "knowledge.list.desc": (
        "The documents in this server's knowledge base",
        "이 서버의 지식 베이스에 있는 문서를 봅니다",
    ),
    "knowledge.remove": ("remove", "삭제"),
    "knowledge.remove.desc": (
        "Remove a document from this server's knowledge base",
        "이 서버의 지식 베이스에서 문서를 삭제합니다",
    ),
    "knowledge.remove.document": ("document", "문서"),
    "knowledge.remove.document.desc": (
        "The document (its id, as /knowledge list shows it)",
        "문서 (/knowledge list에 보이는 ID)",
    ),
    "tools": ("tools", "도구"),
    "tools.desc": (
        "Admins: the tools Libra may use in this server",
        "관리자: 이 서버에서 Libra가 쓸 수 있는 도구",
    ),
    "tools.list": ("list", "목록"),
    "tools.list.desc": (
        "Every installed tool, and which ones are on here",
        "설치된 모든 도구와 여기서 켜진 도구를 봅니다",
    ),
    "tools.enable": ("enable", "켜기"),
    "tools.enable.desc": ("Let Libra use a tool in this server", "이 서버에서 도구를 켭니다"),
    "tools.disable": ("disable", "끄기"),
    "tools.disable.desc": ("Stop Libra using a tool in this server", "이 서버에서 도구를 끕니다"),
    "tools.default": ("default", "기본값"),
    "tools.default.desc": (
        "Go back to Libra's default tools (TOOLS_ENABLED)",
        "Libra의 기본 도구(TOOLS_ENABLED)로 되돌립니다",
    ),
    "tools.name": ("name", "이름"),
    "tools.name.desc": (
        "The tool's name, as /tools list shows it",
        "/tools list에 보이는 도구 이름",
    ),
}

_REPLIES: dict[str, tuple[str, str]] = {
    "chat.on": (
        "Chat mode is on: I'll answer every message in this channel.",
        "채팅 모드를 켰어요. 이 채널의 모든 메시지에 답할게요.",
    ),
    "chat.off": (
        "Chat mode is off: mention me or reply to me to talk.",
        "채팅 모드를 껐어요. 저를 멘션하거나 제 메시지에 답장하면 대화할 수 있어요.",
    ),
    "chat.dm": (
        "In direct messages I always answer; there is no chat mode to switch.",
        "DM에서는 항상 답해요. 켜고 끌 채팅 모드가 없어요.",
    ),
    "refused.chat": (
        "Only members who can manage this channel can switch chat mode.",
        "채널 관리 권한이 있는 멤버만 채팅 모드를 바꿀 수 있어요.",
    ),
    "refused.admin": (
        "Only server admins (Manage Server) can change that.",
        "서버 관리 권한이 있는 관리자만 바꿀 수 있어요.",
    ),
    "refused.access": (
        "Libra isn't available to you here.",
        "여기서는 Libra를 사용할 수 없어요.",
    ),
    "guild.only": (
        "That works in a server, not in DMs.",
        "서버에서만 쓸 수 있어요. DM에서는 안 돼요.",
    ),
    "model.show": ("Model for this server: {value}", "이 서버의 모델: {value}"),
    "model.set": (
        "Model for this server is now {value}.",
        "이 서버의 모델을 {value}(으)로 바꿨어요.",
    ),
    "model.bad": (
        "That doesn't look like a model name: use provider:model or model, without spaces.",
        "모델 이름이 아닌 것 같아요. 공백 없이 제공자:모델 또는 모델 형식으로 써 주세요.",
    ),
    "persona.show": (
        "System prompt for this server:\n{value}",
        "이 서버의 시스템 프롬프트:\n{value}",
    ),
    "persona.set": (
        "System prompt for this server updated.",
        "이 서버의 시스템 프롬프트를 바꿨어요.",
    ),
    "default": ("Libra's default", "Libra 기본값"),
    "cleared": ("Back to Libra's default.", "Libra 기본값으로 되돌렸어요."),
    "reset.conversation": (
        "Done: I forgot our conversation here.",
        "완료: 여기서 나눈 대화를 잊었어요.",
    ),
    "reset.user": ("Done: I forgot what I knew of you.", "완료: 당신에 대해 알던 것을 잊었어요."),
    "stats": (
        "Today: {turns} turns, {prompt} prompt tokens, {completion} reply tokens.",
        "오늘: 대화 {turns}회, 프롬프트 토큰 {prompt}개, 답변 토큰 {completion}개.",
    ),
    "help": (
        "I'm Libra. Mention me or reply to one of my messages and I answer; in a channel with "
        "chat mode on (`/chat on`) I answer every message, and in DMs always. Replying to a "
        "message makes its chain of replies my context; a thread is a conversation of its own.\n"
        "`/reset` forgets our conversation, `/stats` shows your usage today, `/model` and "
        "`/persona` show this server's model and system prompt, `/moderation show` what it "
        "refuses (admins can set them).\n"
        "In voice: `/join` your voice channel and talk; `/voice manual` to talk between "
        "`/record` and `/stop`; `/leave` when you're done.\n"
        "Admins: `/learn` adds a document to this server's knowledge base, which I answer from "
        "and cite (`/knowledge list`, `/knowledge remove`); `/tools` chooses the tools I may use.",
        "저는 Libra예요. 저를 멘션하거나 제 메시지에 답장하면 답해요. 채팅 모드가 켜진 "
        "채널(`/chat on`)에서는 모든 메시지에, DM에서는 항상 답해요. 메시지에 답장하면 그 답장 "
        "흐름을 맥락으로 삼고, 스레드는 따로 하나의 대화예요.\n"
        "`/reset`은 대화를 잊고, `/stats`는 오늘 사용량을, `/model`과 `/persona`는 이 서버의 "
        "모델과 시스템 프롬프트를, `/moderation show`는 거절하는 내용을 보여 줘요 "
        "(관리자는 바꿀 수 있어요).\n"
        "음성: 음성 채널에서 `/join`을 쓰고 말하세요. `/voice manual`이면 `/record`와 `/stop` "
        "사이에만 들어요. 끝나면 `/leave`를 써 주세요.\n"
        "관리자: `/learn`은 이 서버의 지식 베이스에 문서를 추가해요. 저는 그 문서로 답하고 출처를 "
        "밝혀요(`/knowledge list`, `/knowledge remove`). `/tools`로 제가 쓸 도구를 골라요.",
    ),
    "error": (
        "Something went wrong on my side; please try again.",
        "제 쪽에서 문제가 생겼어요. 다시 시도해 주세요.",
    ),
    "timeout": (
        "Sorry, no answer came in time. Please try again in a moment.",
        "죄송해요, 제때 답하지 못했어요. 잠시 후 다시 시도해 주세요.",
    ),
    "rate_limited": (
        "Slow down — try again in {seconds} s.",
        "조금 천천히요 — {seconds}초 뒤에 다시 해 주세요.",
    ),
    "rejected": ("I can't answer that.", "그 질문에는 답할 수 없어요."),
    "failed": (
        "Sorry, I couldn't come up with an answer. Please try again.",
        "죄송해요, 답을 만들지 못했어요. 다시 시도해 주세요.",
    ),
    "empty": ("(no answer)", "(답 없음)"),
    "unavailable": (
        "I can't answer right now, try again in a minute.",
        "지금은 답할 수 없어요. 1분 뒤에 다시 시도해 주세요.",
    ),
    "voice.not_in_channel": (
        "Join a voice channel first, then use /join there.",
        "먼저 음성 채널에 들어간 다음 /join을 써 주세요.",
    ),
    "voice.already": ("I'm already in <#{channel}>.", "이미 <#{channel}>에 있어요."),
    "voice.join_failed": (
        "I couldn't join that voice channel. Check that I may connect and speak there.",
        "음성 채널에 들어가지 못했어요. 제가 연결하고 말할 권한이 있는지 확인해 주세요.",
    ),
    "voice.joined": (
        "I'm in <#{channel}>: talk and I'll answer when you pause. `/voice manual` makes me "
        "listen only between `/record` and `/stop`; `/leave` when you're done.",
        "<#{channel}>에 들어왔어요. 말하고 잠시 멈추면 답할게요. `/voice manual`로 바꾸면 "
        "`/record`와 `/stop` 사이에만 들어요. 끝나면 `/leave`를 써 주세요.",
    ),
    "voice.left": ("Left <#{channel}>.", "<#{channel}>에서 나왔어요."),
    "voice.not_joined": (
        "I'm not in a voice channel here; use /join first.",
        "여기서는 음성 채널에 있지 않아요. 먼저 /join을 써 주세요.",
    ),
    "voice.not_with_libra": (
        "Join me in <#{channel}> first.",
        "먼저 <#{channel}>에 들어와 주세요.",
    ),
    "voice.recording": (
        "Recording: speak, then use /stop.",
        "녹음 중이에요. 말한 다음 /stop을 써 주세요.",
    ),
    "voice.stopped": ("Got it; answering.", "알겠어요, 답할게요."),
    "voice.auto": (
        "Voice mode: automatic. I answer when you pause.",
        "음성 모드: 자동. 말을 멈추면 답할게요.",
    ),
    "voice.manual": (
        "Voice mode: manual. I listen only between /record and /stop.",
        "음성 모드: 수동. /record와 /stop 사이에만 들을게요.",
    ),
    "moderation.policy": (
        "Moderation here\n- engines: {engines}\n- refused categories: {categories}\n"
        "- thresholds: {thresholds}\n- log channel: {log}",
        "이 서버의 검토 정책\n- 엔진: {engines}\n- 거절하는 분류: {categories}\n"
        "- 기준: {thresholds}\n- 기록 채널: {log}",
    ),
    "moderation.words_only": (
        "the word list only (the operator sets classifiers with MODERATION_ENGINES)",
        "금칙어 목록만 (분류기는 운영자가 MODERATION_ENGINES로 설정해요)",
    ),
    "moderation.all": ("all", "전체"),
    "moderation.none": ("none (the word list only)", "없음 (금칙어 목록만)"),
    "moderation.own": ("the engines' own", "엔진의 판단"),
    "moderation.no_log": ("none", "없음"),
    "moderation.bad": ("That isn't a policy I can use: {error}", "쓸 수 없는 값이에요: {error}"),
    "moderation.categories.set": (
        "This server now refuses: {categories}.",
        "이제 이 서버는 다음을 거절해요: {categories}.",
    ),
    "moderation.threshold.set": (
        "{category} is now refused from a score of {score}.",
        "이제 {category}는 점수 {score}부터 거절해요.",
    ),
    "moderation.threshold.cleared": (
        "{category} follows the engine's own judgement again.",
        "{category}는 다시 엔진의 판단을 따라요.",
    ),
    "moderation.log.set": (
        "Flagged messages will be reported in <#{channel}>, with a link, never their text.",
        "신고된 메시지는 <#{channel}>에 알릴게요. 링크만 남기고 내용은 남기지 않아요.",
    ),
    "moderation.log.cleared": (
        "Flagged messages won't be reported in a channel.",
        "신고된 메시지를 채널에 알리지 않아요.",
    ),
    "moderation.log.bad": (
        "Choose a text channel of this server.",
        "이 서버의 텍스트 채널을 골라 주세요.",
    ),
    "modlog.text": (
        "Flagged message from <@{person}> in <#{channel}>: {categories}.",
        "<#{channel}>에서 <@{person}>의 메시지가 걸렸어요: {categories}.",
    ),
    "modlog.voice": (
        "Flagged speech from <@{person}> in <#{channel}>: {categories}.",
        "<#{channel}>에서 <@{person}>의 음성이 걸렸어요: {categories}.",
    ),
    "modlog.reply": (
        "Stopped my reply to <@{person}> in <#{channel}>: {categories}.",
        "<#{channel}>에서 <@{person}>에게 하던 답을 멈췄어요: {categories}.",
    ),
    "modlog.engine": ("Engine: {engine}.", "엔진: {engine}."),
    "modlog.policy": ("Policy: {policy}.", "정책: {policy}."),
    "footer.sources": ("Sources: {sources}", "출처: {sources}"),
    "footer.tools": ("Tools: {tools}", "도구: {tools}"),
    "learn.added": (
        "Added **{title}** to this server's knowledge base: document `{document}`, "
        "{chunks}. I answer from it and cite it from now on.",
        "**{title}**을(를) 이 서버의 지식 베이스에 추가했어요: 문서 `{document}`, "
        "{chunks}. 이제 이 문서로 답하고 출처로 밝힐게요.",
    ),
    "learn.pending": (
        "Added **{title}** to this server's knowledge base as document `{document}`; it is "
        "still being read. `/knowledge list` shows it once it is ready.",
        "**{title}**을(를) 이 서버의 지식 베이스에 문서 `{document}`(으)로 추가했어요. 아직 "
        "읽는 중이에요. 준비되면 `/knowledge list`에 보여요.",
    ),
    "learn.unread": (
        "**{title}** (document `{document}`) was stored but could not be read: {error}",
        "**{title}**(문서 `{document}`)을(를) 저장했지만 읽지 못했어요: {error}",
    ),
    "learn.too_big": (
        "That file is {size}, over the {limit} a document may have. Nothing was added.",
        "파일이 {size}(으)로, 문서 한도 {limit}을(를) 넘어요. 아무것도 추가하지 않았어요.",
    ),
    "learn.too_big.unsaid": (
        "That file is larger than Discord said, over the {limit} a document may have. "
        "Nothing was added.",
        "파일이 Discord가 알린 것보다 커서 문서 한도 {limit}을(를) 넘어요. "
        "아무것도 추가하지 않았어요.",
    ),
    "learn.type": (
        "I can't read that kind of file ({name}): send a txt, md, html or pdf file.",
        "그런 종류의 파일({name})은 읽을 수 없어요. txt, md, html 또는 pdf 파일을 보내 주세요.",
    ),
    "learn.empty": (
        "That file is empty. Nothing was added.",
        "빈 파일이에요. 아무것도 추가하지 않았어요.",
    ),
    "learn.bad": (
        "I couldn't add that file: {error}. Nothing was added.",
        "그 파일을 추가하지 못했어요: {error}. 아무것도 추가하지 않았어요.",
    ),
    "learn.download": (
        "I couldn't download that file from Discord; please try again.",
        "Discord에서 파일을 내려받지 못했어요. 다시 시도해 주세요.",
    ),
    "knowledge.empty": (
        "This server's knowledge base is empty: add a document with `/learn`.",
        "이 서버의 지식 베이스가 비어 있어요. `/learn`으로 문서를 추가해 주세요.",
    ),
    "knowledge.listed": (
        "This server's knowledge base ({count}):\n{lines}",
        "이 서버의 지식 베이스 ({count}개):\n{lines}",
    ),
    "knowledge.line": (
        "`{document}` **{title}** · {chunks} · {size}",
        "`{document}` **{title}** · {chunks} · {size}",
    ),
    "knowledge.line.unread": (
        "`{document}` **{title}** · could not be read: {error}",
        "`{document}` **{title}** · 읽지 못함: {error}",
    ),
    "chunk": ("1 chunk", "조각 1개"),
    "chunks": ("{count} chunks", "조각 {count}개"),
    "knowledge.more": ("… and {count} more", "… 외 {count}개"),
    "knowledge.removed": (
        "Removed **{title}** (`{document}`) from this server's knowledge base.",
        "이 서버의 지식 베이스에서 **{title}**(`{document}`)을(를) 삭제했어요.",
    ),
    "knowledge.unknown": (
        "There's no document `{document}` in this server's knowledge base; "
        "`/knowledge list` shows its documents.",
        "이 서버의 지식 베이스에 `{document}` 문서가 없어요. `/knowledge list`로 문서를 "
        "확인해 주세요.",
    ),
    "tools.listed": (
        "Tools in this server ({source}):\n{lines}",
        "이 서버의 도구 ({source}):\n{lines}",
    ),
    "tools.chosen": ("this server's choice", "이 서버가 고른 도구"),
    "tools.default_source": (
        "none chosen here, so Libra's default: TOOLS_ENABLED",
        "고른 도구가 없어 Libra 기본값 TOOLS_ENABLED를 따름",
    ),
    "tools.on": ("on", "켜짐"),
    "tools.off": ("off", "꺼짐"),
    "tools.servers_only": ("servers only", "서버 전용"),
    "tools.missing": (
        "Enabled but not installed: {names}",
        "켜져 있지만 설치되지 않음: {names}",
    ),
    "tools.none_installed": ("No tools are installed.", "설치된 도구가 없어요."),
    "tools.none": ("none", "없음"),
    "tools.unknown": (
        "There's no tool named `{name}`. Installed tools: {known}.",
        "`{name}`(이)라는 도구는 없어요. 설치된 도구: {known}.",
    ),
    "tools.enabled": (
        "`{name}` is on in this server. On here: {enabled}.",
        "이 서버에서 `{name}`을(를) 켰어요. 켜진 도구: {enabled}.",
    ),
    "tools.disabled": (
        "`{name}` is off in this server. On here: {enabled}.",
        "이 서버에서 `{name}`을(를) 껐어요. 켜진 도구: {enabled}.",
    ),
    "tools.already_on": (
        "`{name}` is already on here. On here: {enabled}.",
        "`{name}`은(는) 이미 켜져 있어요. 켜진 도구: {enabled}.",
    ),
    "tools.already_off": (
        "`{name}` is already off here. On here: {enabled}.",
        "`{name}`은(는) 이미 꺼져 있어요. 켜진 도구: {enabled}.",
    ),
    "tools.reset": (
        "This server uses Libra's default tools again (TOOLS_ENABLED): {enabled}.",
        "이 서버는 다시 Libra의 기본 도구(TOOLS_ENABLED)를 써요: {enabled}.",
    ),
}


def _korean(locale: str) -> bool:
    return locale.lower().startswith("ko")


def say(key: str, locale: str = "", **values: object) -> str:
    """Returns the reply ``key`` in the language of ``locale`` (Korean for ``ko``, else English)."""
    english, korean = _REPLIES[key]
    return (korean if _korean(locale) else english).format(**values)


def localization() -> lightbulb.DictLocalizationProvider:
    """The command names and descriptions for lightbulb, in English (the default) and Korean."""
    by_locale: dict[hikari.Locale, Mapping[str, str]] = {
        hikari.Locale.EN_US: {k: v[0] for k, v in COMMAND_TEXTS.items()},
        hikari.Locale.EN_GB: {k: v[0] for k, v in COMMAND_TEXTS.items()},
        hikari.Locale.KO: {k: v[1] for k, v in COMMAND_TEXTS.items()},
    }
    return lightbulb.DictLocalizationProvider(by_locale)
