import numpy as np
import pytest

import optstate


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace):
    doctest_namespace.update(optstate=optstate, np=np)
