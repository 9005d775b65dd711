"""Libra's contracts: events, subjects, streams and consumers. Imports nothing else of Libra."""

from .events import *  # noqa: F403
from .events import __all__ as _events_all
from .ids import *  # noqa: F403
from .ids import __all__ as _ids_all
from .streams import *  # noqa: F403
from .streams import __all__ as _streams_all
from .subjects import *  # noqa: F403
from .subjects import __all__ as _subjects_all
from .text import *  # noqa: F403
from .text import __all__ as _text_all
from .users import *  # noqa: F403
from .users import __all__ as _users_all

__all__ = [*_events_all, *_ids_all, *_streams_all, *_subjects_all, *_text_all, *_users_all]
