"""`libra eval`: recorded turns answered by candidate configurations, side by side."""
