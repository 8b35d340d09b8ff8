"""Tests for Django's test runner (`manage.py test --parallel 2`) on a dbha
backend: each writes to its test database and records that database's name
in the file DBHA_TEST_RECORD."""

import os

from django.db import connections
from django.test import TestCase

from tests.testapp.models import Item


class OnTheTestDatabase:
    def check_database(self) -> None:
        connection = connections["default"]
        assert type(connection).__module__.startswith("dbha.backends."), type(connection)
        name = connection.settings_dict["NAME"]
        Item.objects.create(name=name)
        assert list(Item.objects.values_list("name", flat=True)) == [name]
        with open(os.environ["DBHA_TEST_RECORD"], "a") as record:
            record.write(f"{name}\n")


class FirstCase(OnTheTestDatabase, TestCase):
    def test_database(self) -> None:
        self.check_database()


class SecondCase(OnTheTestDatabase, TestCase):
    def test_database(self) -> None:
        self.check_database()
