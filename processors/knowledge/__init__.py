"""Knowledge bases: documents read, chunked, embedded and searched for a turn's prompt."""
