"""`--demo`: a small database in the gateway's schema, so the service runs with nothing else."""

from __future__ import annotations

import secrets
import sqlite3
import string
import time
from pathlib import Path

DEMO_DB = Path("usage-service-demo.db")
DEMO_TOKEN_NAME = "demo"

# new-api's tables as its ORM lays them out on SQLite (only the ones the service reads).
GATEWAY_SCHEMA = """
CREATE TABLE `tokens` (
  `id` integer PRIMARY KEY AUTOINCREMENT,
  `user_id` integer,
  `key` varchar(128),
  `status` integer DEFAULT 1,
  `name` text,
  `created_time` integer,
  `accessed_time` integer,
  `expired_time` integer DEFAULT -1,
  `remain_quota` integer DEFAULT 0,
  `unlimited_quota` numeric,
  `model_limits_enabled` numeric,
  `model_limits` text,
  `allow_ips` text DEFAULT '',
  `used_quota` integer DEFAULT 0,
  `group` text DEFAULT '',
  `cross_group_retry` numeric,
  `billing_type` integer DEFAULT 0,
  `deleted_at` datetime
);
CREATE UNIQUE INDEX `idx_tokens_key` ON `tokens`(`key`);
CREATE INDEX `idx_tokens_user_id` ON `tokens`(`user_id`);
CREATE INDEX `idx_tokens_name` ON `tokens`(`name`);
CREATE INDEX `idx_tokens_deleted_at` ON `tokens`(`deleted_at`);

CREATE TABLE `users` (
  `id` integer PRIMARY KEY AUTOINCREMENT,
  `username` text UNIQUE,
  `password` text NOT NULL,
  `display_name` text,
  `role` integer DEFAULT 1,
  `status` integer DEFAULT 1,
  `email` text,
  `access_token` char(32),
  `quota` integer DEFAULT 0,
  `used_quota` integer DEFAULT 0,
  `request_count` integer DEFAULT 0,
  `group` varchar(64) DEFAULT 'default',
  `aff_code` varchar(32),
  `inviter_id` integer,
  `setting` text,
  `deleted_at` datetime
);
CREATE INDEX `idx_users_username` ON `users`(`username`);
CREATE INDEX `idx_users_deleted_at` ON `users`(`deleted_at`);
CREATE UNIQUE INDEX `idx_users_access_token` ON `users`(`access_token`);
CREATE UNIQUE INDEX `idx_users_aff_code` ON `users`(`aff_code`);

CREATE TABLE `options` (
  `key` text,
  `value` text,
  PRIMARY KEY (`key`)
);

CREATE TABLE `logs` (
  `id` integer PRIMARY KEY AUTOINCREMENT,
  `user_id` integer,
  `created_at` bigint,
  `type` integer,
  `content` text,
  `username` text DEFAULT '',
  `token_name` text DEFAULT '',
  `model_name` text DEFAULT '',
  `quota` integer DEFAULT 0,
  `prompt_tokens` integer DEFAULT 0,
  `completion_tokens` integer DEFAULT 0,
  `use_time` integer DEFAULT 0,
  `is_stream` numeric,
  `channel_id` integer,
  `token_id` integer DEFAULT 0,
  `group` text,
  `ip` text DEFAULT '',
  `other` text
);
CREATE INDEX `idx_created_at_id` ON `logs`(`id`,`created_at`);
CREATE INDEX `idx_logs_user_id` ON `logs`(`user_id`);
CREATE INDEX `idx_created_at_type` ON `logs`(`created_at`,`type`);
CREATE INDEX `idx_logs_username` ON `logs`(`username`);
CREATE INDEX `index_username_model_name` ON `logs`(`model_name`,`username`);
CREATE INDEX `idx_logs_token_name` ON `logs`(`token_name`);
CREATE INDEX `idx_logs_model_name` ON `logs`(`model_name`);
CREATE INDEX `idx_logs_channel_id` ON `logs`(`channel_id`);
CREATE INDEX `idx_logs_token_id` ON `logs`(`token_id`);
CREATE INDEX `idx_logs_group` ON `logs`(`group`);
CREATE INDEX `idx_logs_ip` ON `logs`(`ip`);
"""

_ALPHABET = string.ascii_letters + string.digits


def new_key() -> str:
    """Generate a key the way the gateway does: 48 letters and digits, stored without 'sk-'."""
    return "".join(secrets.choice(_ALPHABET) for _ in range(48))


def ensure_demo_db(path: Path = DEMO_DB) -> str:
    """Create the demo database with one token unless it exists; return the demo token's key.

    This writes only to the demo's own file, never to a gateway's.
    """
    with sqlite3.connect(path) as db:
        if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'tokens'").fetchone():
            db.executescript(GATEWAY_SCHEMA)
        row = db.execute(
            "SELECT `key` FROM tokens WHERE name = ? AND deleted_at IS NULL", (DEMO_TOKEN_NAME,)
        ).fetchone()
        if row:
            return str(row[0])
        now = int(time.time())
        user_id = db.execute(
            "INSERT INTO users (username, password, display_name, status, quota, used_quota)"
            " VALUES ('demo', '!', 'Demo user', 1, 5000000, 123456)"
        ).lastrowid
        key = new_key()
        db.execute(
            "INSERT INTO tokens (user_id, `key`, status, name, created_time, accessed_time, expired_time,"
            " remain_quota, unlimited_quota, model_limits_enabled, model_limits, used_quota)"
            " VALUES (?, ?, 1, ?, ?, ?, -1, 4876544, 0, 1, 'gpt-4o-mini, claude-3-5-haiku', 123456)",
            (user_id, key, DEMO_TOKEN_NAME, now, now),
        )
        token_id = db.execute("SELECT id FROM tokens WHERE `key` = ?", (key,)).fetchone()[0]
        # A week of requests in the log, as the gateway writes it, for the history and log routes:
        # 24 of 5,144 quota each, which is the token's used quota.
        db.executemany(
            "INSERT INTO logs (user_id, created_at, type, content, username, token_name, model_name, quota,"
            " prompt_tokens, completion_tokens, use_time, is_stream, channel_id, token_id, `group`, other)"
            " VALUES (?, ?, 2, '', 'demo', ?, ?, 5144, 1200, 300, 2, 0, 1, ?, 'default', '{}')",
            [
                (
                    user_id,
                    now - (24 - i) * 7 * 3600,
                    DEMO_TOKEN_NAME,
                    ("gpt-4o-mini", "claude-3-5-haiku")[i % 2],
                    token_id,
                )
                for i in range(24)
            ],
        )
    return key
