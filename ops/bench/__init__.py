"""`libra bench ...`: each benchmark measures Libra beside a bare baseline in the same run."""
