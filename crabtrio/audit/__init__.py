"""The audit log: records, the JSONL file, its sorted index and the writer that feeds them."""

from .index import AuditIndex as AuditIndex, Page as Page
from .log import AuditLog as AuditLog
from .pending import PendingRecord as PendingRecord
from .reader import AuditReader as AuditReader
from .record import AuditRecord as AuditRecord
from .store import AuditFile as AuditFile
from .writer import AuditLogger as AuditLogger, AuditStatistics as AuditStatistics
