"""`nerbatch.errors`: every user error is a `NerbatchError` (one line, exit status 1)."""

from __future__ import annotations

from nerbatch.dist import LaunchError
from nerbatch.errors import NerbatchError
from nerbatch.parquet_io import InputError


def test_every_user_error_is_a_nerbatch_error():
    from nerbatch.config import ConfigError
    from nerbatch.data import DataError
    from nerbatch.errors import OptionError
    from nerbatch.job import UnitsFailed
    from nerbatch.modeling import ModelError

    for error in (ConfigError, DataError, InputError, LaunchError, ModelError, OptionError, UnitsFailed):
        assert issubclass(error, NerbatchError), error
