"""``warn_user`` names the first caller outside sanet, timm and torch: the direct caller when
that is the user's code, and a folder next to sanet's (same name prefix) is the user's."""
from __future__ import annotations

import os
import warnings

import sanet


def _warnings_of(call):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [(w.filename, str(w.message)) for w in caught]


def test_a_direct_call_from_user_code_names_that_line():
    from sanet.errors import warn_user

    assert _warnings_of(lambda: warn_user("hello")) == [(__file__, "hello")]


def test_a_file_beside_the_package_with_its_name_as_prefix_is_user_code():
    """``.../sanet_scripts/x.py`` starts with the package folder's path, but is not in it."""
    from sanet.errors import warn_user

    fake = os.path.dirname(sanet.__file__) + "_scripts" + os.sep + "mine.py"
    namespace = {"warn_user": warn_user}
    exec(compile("def user():\n    warn_user('from a script')\n", fake, "exec"), namespace)
    assert _warnings_of(namespace["user"]) == [(fake, "from a script")]
    inside = os.path.join(os.path.dirname(sanet.__file__), "fake_module.py")  # in the package: skipped
    exec(compile("def lib():\n    warn_user('from the library')\n", inside, "exec"), namespace)
    assert _warnings_of(namespace["lib"]) == [(__file__, "from the library")]
