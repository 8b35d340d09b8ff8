"""Django's MySQL/MariaDB backend (mysqlclient), unchanged but for its
error wrapper, which reports server failures to dbha."""

from django.db.backends.mysql import base
from django.db.utils import DatabaseErrorWrapper
from django.utils.functional import cached_property

from dbha.backends.failures import mysql_failure
from dbha.backends.reporting import FailureReporter


class DatabaseWrapper(base.DatabaseWrapper):
    @cached_property
    def wrap_database_errors(self) -> DatabaseErrorWrapper:
        return FailureReporter(self, self.Database, mysql_failure)
