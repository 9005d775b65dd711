-- A person is platform:id everywhere: the Discord user 123 is 'discord:123', the HTTP user
-- alice is 'http:alice'. Rows folded before that hold raw ids, so an HTTP user whose id was a
-- Discord user's digits read that person's history and shared their memories. Each row gets its
-- conversation's platform (conversations.platform, else the conversation id's first token,
-- 'discord-1-2' -> 'discord'), as reading an old event gives it its origin's platform. A row
-- whose id already starts with its platform and a colon is namespaced and stays as it is, so
-- running this again changes nothing.

UPDATE messages AS m
   SET user_id = w.platform || ':' || m.user_id
  FROM (SELECT r.event_id, coalesce(c.platform, split_part(r.conversation, '-', 1)) AS platform
          FROM messages AS r LEFT JOIN conversations AS c ON c.id = r.conversation) AS w
 WHERE w.event_id = m.event_id AND m.user_id <> ''
   AND left(m.user_id, length(w.platform) + 1) <> w.platform || ':';

UPDATE turns AS t
   SET user_id = w.platform || ':' || t.user_id
  FROM (SELECT r.turn,
               coalesce(r.platform, c.platform, split_part(r.conversation, '-', 1)) AS platform
          FROM turns AS r LEFT JOIN conversations AS c ON c.id = r.conversation) AS w
 WHERE w.turn = t.turn AND t.user_id <> ''
   AND left(t.user_id, length(w.platform) + 1) <> w.platform || ':';

UPDATE memories AS m
   SET user_id = w.platform || ':' || m.user_id
  FROM (SELECT r.event_id, coalesce(c.platform, split_part(r.conversation, '-', 1)) AS platform
          FROM memories AS r LEFT JOIN conversations AS c ON c.id = r.conversation) AS w
 WHERE w.event_id = m.event_id AND m.user_id <> ''
   AND left(m.user_id, length(w.platform) + 1) <> w.platform || ':';

-- Resets and settings come from Discord's slash commands alone (/reset, /model, /persona): a
-- reset of every conversation has none to take the platform from.
UPDATE memory_resets AS m
   SET user_id = w.platform || ':' || m.user_id
  FROM (SELECT r.event_id,
               coalesce(c.platform, split_part(r.conversation, '-', 1), 'discord') AS platform
          FROM memory_resets AS r LEFT JOIN conversations AS c ON c.id = r.conversation) AS w
 WHERE w.event_id = m.event_id AND m.user_id <> ''
   AND left(m.user_id, length(w.platform) + 1) <> w.platform || ':';

UPDATE chat_channels AS s
   SET changed_by = w.platform || ':' || s.changed_by
  FROM (SELECT r.conversation, coalesce(c.platform, split_part(r.conversation, '-', 1)) AS platform
          FROM chat_channels AS r LEFT JOIN conversations AS c ON c.id = r.conversation) AS w
 WHERE w.conversation = s.conversation AND s.changed_by <> ''
   AND left(s.changed_by, length(w.platform) + 1) <> w.platform || ':';

UPDATE settings
   SET changed_by = 'discord:' || changed_by
 WHERE changed_by <> '' AND left(changed_by, 8) <> 'discord:';
