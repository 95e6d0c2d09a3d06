"""A realistic, entirely invented KakaoTalk PC export (Korean) of a persona with a recognisable style, shared by
tests/test_persona.py and benchmarks/persona_walkthrough.py (issue 17's walkthrough). No personal data: the
names, the phone number and every message are made up.

The persona 지우 ends most sentences with 용/당/엉 ("좋아용", "맛있겠당") and often says "헐 대박"; the friend
민준 writes plain 반말. The file has what real PC exports have: a UTF-8 BOM, CRLF line ends, the header, date
lines, multi-line messages, several messages in a row, photo/emoticon placeholders, a deleted message and a phone
number (scrubbed by default).
"""

from __future__ import annotations

import random
from datetime import date, timedelta
from pathlib import Path

PERSONA = "지우"
FRIEND = "민준"

# (friend's opener, the persona's possible replies, friend's follow-ups, the persona's second replies)
TOPICS: list[tuple[list[str], list[str], list[str], list[str]]] = [
    (["점심 뭐 먹었어?", "밥 먹었어?", "오늘 점심 뭐야"],
     ["김치찌개 먹었어용", "아직 안 먹었엉 배고팡", "떡볶이 먹었당 헐 대박 맛있었어용", "편의점 김밥 먹었당"],
     ["부럽다", "나도 배고프다", "어디서 먹었어?"],
     ["학교 앞 분식집이용", "다음에 같이 가장", "헐 대박 거기 진짜 맛있당"]),
    (["주말에 뭐 해?", "이번 주말 시간 있어?", "토요일에 뭐 할 거야"],
     ["집에서 쉴 거당", "영화 보러 갈 거예용", "헐 대박 나 주말에 알바 있엉", "아직 모르겠엉"],
     ["같이 놀자", "무슨 영화?", "알바 힘들겠다"],
     ["좋아용 몇 시에 만날까용", "그 새로 나온 거 보고 싶당", "괜찮아용 금방 끝나용"]),
    (["과제 다 했어?", "레포트 언제까지야?", "시험 공부 하고 있어?"],
     ["아직 반도 못 했엉", "금요일까지래용", "헐 대박 그거 내일까지였어?", "어제 밤새서 다 했당"],
     ["나도 아직이야", "같이 도서관 갈래?", "큰일났네"],
     ["좋아용 도서관에서 보장", "진짜 큰일이당", "힘내장 우리"]),
    (["오늘 날씨 완전 춥다", "밖에 비 온다", "오늘 미세먼지 심하대"],
     ["헐 대박 나 우산 안 가져왔엉", "진짜 춥당 패딩 입었어용", "마스크 꼭 써용", "집에만 있고 싶당"],
     ["우산 빌려줄까?", "감기 조심해", "나도 나가기 싫다"],
     ["고마워용 진짜 착하당", "너도 조심해용", "오늘은 집에 있장"]),
    (["지금 뭐 해?", "자?", "바빠?"],
     ["유튜브 보고 있었당", "아니 안 자용", "조금 바빠용 나중에 연락할게용", "누워 있었엉"],
     ["심심하다", "전화해도 돼?", "뭐 보는데"],
     ["나도 심심해용", "응 전화해용", "고양이 영상 보고 있당 귀여워용"]),
    (["생일 축하해!", "오늘 생일이지?", "생일 선물 뭐 갖고 싶어?"],
     ["헐 대박 기억해줬어? 고마워용", "맞아용 오늘이당", "아무거나 다 좋아용", "케이크 먹고 싶당"],
     ["맛있는 거 사줄게", "케이크 사 갈게", "축하해"],
     ["진짜 최고당", "기대할게용", "고마워용 감동이당"]),
    (["게임 할래?", "롤 한 판 할까", "오늘 겜 ㄱ?"],
     ["좋아용 지금 들어갈게용", "헐 대박 나 지금 하려고 했는뎅", "이따 저녁에 하장", "오늘은 피곤해용"],
     ["ㅇㅋ 들어와", "몇 시?", "그럼 내일 하자"],
     ["8시에 하장", "알겠어용", "내일은 꼭 하장"]),
    (["카페 갈래?", "커피 마시러 가자", "새로 생긴 카페 가봤어?"],
     ["좋아용 어디로 갈까용", "헐 대박 나도 가보고 싶었당", "아직 안 가봤엉", "오늘은 돈이 없엉"],
     ["역 앞에 있는 데", "내가 살게", "거기 케이크 맛있대"],
     ["그럼 3시에 보장", "진짜용? 고마워용", "케이크 좋아용"]),
    (["집에 언제 가?", "몇 시에 끝나?", "퇴근했어?"],
     ["6시에 끝나용", "이제 가는 중이당", "오늘 야근이엉", "벌써 집이당"],
     ["수고했어", "같이 저녁 먹을래?", "힘들겠다"],
     ["고마워용", "좋아용 뭐 먹을까용", "내일은 쉬고 싶당"]),
    (["이 노래 들어봤어?", "요즘 무슨 노래 들어?", "콘서트 티켓 구했어?"],
     ["아직 안 들어봤엉", "요즘 아이유 노래만 들어용", "헐 대박 구했어? 부럽당", "못 구했엉 슬프당"],
     ["완전 좋아", "나도 그거 들어", "취소표 나올 수도 있어"],
     ["이따 들어볼게용", "역시 취향 맞당", "계속 새로고침 해볼게용"]),
]

PLACEHOLDERS = ["사진", "이모티콘", "사진 3장", "삭제된 메시지입니다."]
WEEKDAYS = "월화수목금토일"


def _ampm(hour: int, minute: int) -> str:
    half = "오전" if hour < 12 else "오후"
    h = hour % 12 or 12
    return f"{half} {h}:{minute:02d}"


def persona_export_text(days: int = 14, *, seed: int = 0, start: date = date(2024, 3, 4)) -> str:
    """The export's text (LF line ends; `write_persona_export` writes it as a PC export does)."""
    rng = random.Random(seed)
    lines = [f"{FRIEND} 님과 카카오톡 대화", f"저장한 날짜 : {start + timedelta(days=days):%Y-%m-%d} 21:14:05", ""]
    minute = 0

    def say(who: str, text: str) -> None:
        nonlocal minute
        minute += rng.randint(1, 9)
        lines.append(f"[{who}] [{_ampm(min(minute // 60, 23), minute % 60)}] {text}")

    for d in range(days):
        day = start + timedelta(days=d)
        lines.append(f"--------------- {day.year}년 {day.month}월 {day.day}일 {WEEKDAYS[day.weekday()]}요일 "
                     "---------------")
        minute = rng.randrange(8 * 60, 11 * 60)
        topics = rng.sample(range(len(TOPICS)), rng.randint(2, 3))
        for t in topics:
            opener, replies, follow, second = TOPICS[t]

            say(FRIEND, rng.choice(opener))
            if rng.random() < 0.2:
                say(FRIEND, rng.choice(PLACEHOLDERS))
            reply = rng.choice(replies)
            if rng.random() < 0.25:  # a two-line message
                reply += "\n" + rng.choice(["ㅋㅋㅋ", "근데 너는?", "헐 대박"])
            say(PERSONA, reply)
            say(FRIEND, rng.choice(follow))
            say(PERSONA, rng.choice(second))
            if rng.random() < 0.3:  # two messages in a row
                say(PERSONA, rng.choice(["ㅋㅋㅋ", "이모티콘", "헐 대박", "알겠어용"]))
            minute += rng.randint(60, 180)
        if d == 2:
            say(FRIEND, "내 번호 바뀌었어 010-2468-1357")
            say(PERSONA, "알겠어용 저장할게용")
    return "\n".join(lines) + "\n"


def write_persona_export(path: str | Path, days: int = 14, *, seed: int = 0) -> Path:
    """Write the export as KakaoTalk for Windows does: UTF-8 with a BOM, CRLF line ends."""
    path = Path(path)
    path.write_bytes(b"\xef\xbb\xbf" + persona_export_text(days, seed=seed).replace("\n", "\r\n").encode("utf-8"))
    return path
