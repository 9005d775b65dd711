-- Only admitted turns are history. The history projection used to fold every text.received, so a
-- message that admission refused (a blocked word, over MAX_INPUT_CHARS, rate-limited) was kept
-- as the person's words: read back into later prompts (theirs and, in a server channel, other
-- people's) and shown by the history route. The turns projection records each turn's decision:
-- reject_reason is set by turn.rejected alone and kept once set (its status may move on to
-- 'delivered' when the refusal is shown), so it marks the refused turns whose rows go.
DELETE FROM messages AS m
USING turns AS t
WHERE m.turn = t.turn AND m.role = 'user' AND t.reject_reason IS NOT NULL;
