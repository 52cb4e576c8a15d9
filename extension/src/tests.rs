//! Unit tests. Plain `#[test]`s cover the pure parts (key parsing, sealing, validation,
//! passwords); `#[pg_test]`s run inside the throwaway cluster of `cargo pgrx test`, whose
//! settings come from `crate::pg_test::postgresql_conf_options`.

#[pgrx::pg_schema]
// `cargo pgrx test` also builds the library with the `pg_test` feature but without
// `cfg(test)`: the plain `#[test]`s are left out there, and their helpers would warn.
#[cfg_attr(not(test), allow(unused_imports, dead_code))]
mod tests {
    use crate::crypto::{self, Binding, ValueKind};
    use crate::keys::parse_keys;
    use crate::password::{random_password, PasswordRules};
    use crate::validate;
    use pgrx::prelude::*;

    const KEY_A: &str = "1111111111111111111111111111111111111111111111111111111111111111";
    const KEY_B: &str = "2222222222222222222222222222222222222222222222222222222222222222";

    fn binding(kind: ValueKind) -> Binding {
        Binding {
            secret_id: [1; 16],
            version_id: [2; 16],
            kind,
        }
    }

    #[test]
    fn key_file_formats() {
        let ring = parse_keys(&format!("# comment\n\nk1:{KEY_A}\nk2:{KEY_B}\n"), None).unwrap();
        assert_eq!(ring.active().id, "k1");
        assert!(ring.get("k2").is_some());
        let ring = parse_keys(&format!("k1:{KEY_A}\nk2:{KEY_B}"), Some("k2")).unwrap();
        assert_eq!(ring.active().id, "k2");
        let ring = parse_keys(KEY_A, None).unwrap();
        assert_eq!(ring.active().id, "default");
    }

    #[test]
    fn key_file_errors_never_echo_the_key() {
        let cases = [
            format!("k1:{}", &KEY_A[..60]),
            format!("k1:{KEY_A}\n{KEY_B}"),
            format!("k1:{KEY_A}\nk1:{KEY_B}"),
            format!("bad id:{KEY_A}"),
            format!("k1:{}zz", &KEY_A[..62]),
            "".to_string(),
            format!("k1:{KEY_A}"),
        ];
        for (i, text) in cases.iter().enumerate() {
            let active = if i == cases.len() - 1 {
                Some("missing")
            } else {
                None
            };
            let error = parse_keys(text, active).err().expect("must be refused");
            assert!(
                !error.contains("1111") && !error.contains("2222"),
                "{error}"
            );
        }
        let id = |chars: usize| "k".repeat(chars);
        assert!(parse_keys(&format!("{}:{KEY_A}", id(64)), None).is_ok());
        for refused in [id(65), String::new()] {
            let error = parse_keys(&format!("{refused}:{KEY_A}"), None).err();
            assert!(
                error.is_some_and(|error| error.contains("a key id is 1 to 64 characters")),
                "a key id of {} characters",
                refused.len()
            );
        }
    }

    #[test]
    fn sealing_round_trips_and_detects_every_change() {
        let ring = parse_keys(&format!("k1:{KEY_A}\nk2:{KEY_B}"), None).unwrap();
        let (k1, k2) = (ring.get("k1").unwrap(), ring.get("k2").unwrap());
        let sealed = crypto::seal(k1, &binding(ValueKind::String), b"hunter2");
        assert!(!sealed.ciphertext.windows(7).any(|w| w == b"hunter2"));
        let open =
            |b: &Binding, wrapped: &[u8], ct: &[u8]| crypto::open(k1, b, wrapped, ct.to_vec());
        assert_eq!(
            open(
                &binding(ValueKind::String),
                &sealed.wrapped_key,
                &sealed.ciphertext
            )
            .unwrap()
            .as_slice(),
            b"hunter2"
        );
        let mut flipped = sealed.ciphertext.clone();
        flipped[20] ^= 1;
        assert!(open(&binding(ValueKind::String), &sealed.wrapped_key, &flipped).is_err());
        // Too short to hold a nonce and a tag; a wrapped key cut short, or changed.
        let string = binding(ValueKind::String);
        assert!(open(&string, &sealed.wrapped_key, &sealed.ciphertext[..27]).is_err());
        let wrapped = &sealed.wrapped_key;
        assert!(open(&string, &wrapped[..wrapped.len() - 1], &sealed.ciphertext).is_err());
        let mut flipped_key = wrapped.clone();
        flipped_key[15] ^= 1;
        assert!(open(&string, &flipped_key, &sealed.ciphertext).is_err());
        assert!(open(
            &binding(ValueKind::Binary),
            &sealed.wrapped_key,
            &sealed.ciphertext
        )
        .is_err());
        let moved = Binding {
            secret_id: [9; 16],
            ..binding(ValueKind::String)
        };
        assert!(open(&moved, &sealed.wrapped_key, &sealed.ciphertext).is_err());
        assert!(crypto::open(
            k2,
            &binding(ValueKind::String),
            &sealed.wrapped_key,
            sealed.ciphertext.clone()
        )
        .is_err());
        let rewrapped =
            crypto::rewrap(k1, k2, &binding(ValueKind::String), &sealed.wrapped_key).unwrap();
        assert_eq!(
            crypto::open(
                k2,
                &binding(ValueKind::String),
                &rewrapped,
                sealed.ciphertext.clone()
            )
            .unwrap()
            .as_slice(),
            b"hunter2"
        );
        assert!(crypto::verify_key_check(k1, &crypto::key_check_value(k1)));
        assert!(!crypto::verify_key_check(k2, &crypto::key_check_value(k1)));
    }

    fn rules(length: i32) -> PasswordRules<'static> {
        PasswordRules {
            length,
            exclude_characters: "",
            exclude_numbers: false,
            exclude_punctuation: false,
            exclude_uppercase: false,
            exclude_lowercase: false,
            include_space: false,
            require_each_included_type: true,
        }
    }

    #[test]
    fn passwords_follow_the_rules() {
        for _ in 0..200 {
            let password = random_password(&rules(4)).unwrap();
            assert_eq!(password.chars().count(), 4);
            assert!(password.chars().any(|c| c.is_ascii_lowercase()));
            assert!(password.chars().any(|c| c.is_ascii_uppercase()));
            assert!(password.chars().any(|c| c.is_ascii_digit()));
            assert!(password.chars().any(|c| c.is_ascii_punctuation()));
        }
        let only_digits = PasswordRules {
            exclude_punctuation: true,
            exclude_uppercase: true,
            exclude_lowercase: true,
            exclude_characters: "0123",
            ..rules(64)
        };
        let password = random_password(&only_digits).unwrap();
        assert!(
            password.chars().all(|c| ('4'..='9').contains(&c)),
            "{password}"
        );
        assert!(random_password(&rules(0)).is_err());
        assert!(random_password(&rules(4097)).is_err());
        assert!(random_password(&rules(3)).is_err());
        let nothing_left = PasswordRules {
            exclude_characters: "0123456789",
            ..only_digits
        };
        assert!(random_password(&nothing_left).is_err());
    }

    #[test]
    fn names_and_limits() {
        assert!(validate::secret_name("prod/db/main-1_a+b=c.d@e").is_ok());
        assert!(validate::secret_name("").is_err());
        assert!(validate::secret_name("a b").is_err());
        assert!(validate::secret_name(&"a".repeat(512)).is_ok());
        assert!(validate::secret_name(&"a".repeat(513)).is_err());
        assert!(validate::recovery_window(Some(6), false).is_err());
        assert!(validate::recovery_window(Some(31), false).is_err());
        assert!(validate::recovery_window(Some(7), true).is_err());
        assert_eq!(validate::recovery_window(None, false).unwrap(), 30);
    }

    /// The queued form decodes to the same record; the hash chain still covers exactly the
    /// compact JSON array `[id,record]` that records stored before the queued form changed were
    /// chained with, so they keep verifying.
    #[test]
    fn audit_record_forms() {
        use crate::audit::{trail::chain_hash, Record};
        use sha2::{Digest, Sha256};
        let record = Record {
            at_micros: 1_700_000_000_123_456,
            session_user: "app".into(),
            current_user: "app \"quoted\" \u{e9}".into(),
            action: "get".into(),
            secret_name: Some("prod/db".into()),
            secret_id: Some("0b9f3c4e-1d2a-4c5b-8e6f-7a8b9c0d1e2f".into()),
            client_port: Some(5432),
            backend_pid: 4242,
            details: r#"{"function":"get_secret_value"}"#.into(),
            ..Record::default()
        };
        assert_eq!(
            Record::from_queued(&record.to_queued()),
            Some(record.clone())
        );
        assert_eq!(Record::from_queued(&record.to_queued()[..20]), None);
        let previous = [7u8; 32];
        let mut expected = Sha256::new();
        expected.update(previous);
        expected.update(serde_json::to_vec(&(41i64, &record)).unwrap());
        assert_eq!(
            chain_hash(&previous, 41, &record.to_json()),
            <[u8; 32]>::from(expected.finalize())
        );
        let line = crate::audit::server_log_line(&record, &record.to_json(), None);
        assert!(line.starts_with(b"2023-11-14 22:13:20.123 UTC [4242] LOG:  pg_secrets audit: {"));
        // A stored record's line carries its id and hash inside the JSON object.
        let stored =
            crate::audit::server_log_line(&record, &record.to_json(), Some((41, &[0xab; 32])));
        let text = String::from_utf8(stored).unwrap();
        let (_, json) = text.split_once("pg_secrets audit: ").unwrap();
        let json: serde_json::Value = serde_json::from_str(json.trim_end()).unwrap();
        assert_eq!(json["id"], 41);
        assert_eq!(json["hash"], "ab".repeat(32));
        assert_eq!(json["backend_pid"], 4242);
        // The date is kept per second: lines in the same second, the next one, before 1970,
        // and a time no calendar here can show (the line then starts at the pid).
        for (at_micros, start) in [
            (
                1_700_000_000_007_000,
                &b"2023-11-14 22:13:20.007 UTC [4242]"[..],
            ),
            (1_700_000_001_999_999, b"2023-11-14 22:13:21.999 UTC [4242]"),
            (-1_500_000, b"1969-12-31 23:59:58.500 UTC [4242]"),
            (i64::MAX, b"[4242] LOG:  pg_secrets audit: {}\n"),
        ] {
            let line = crate::audit::server_log_line(
                &Record {
                    at_micros,
                    ..record.clone()
                },
                b"{}",
                None,
            );
            assert!(
                line.starts_with(start),
                "{}",
                String::from_utf8_lossy(&line)
            );
        }
    }

    /// The text the hash chain covers: keys in serde_json's (sorted) map order.
    #[test]
    fn audit_details_text() {
        use crate::audit::details_json;
        assert_eq!(
            details_json("get_secret_value", Default::default(), None),
            r#"{"function":"get_secret_value"}"#
        );
        let mut notes = serde_json::Map::new();
        notes.insert("stage".into(), "PENDING".into());
        assert_eq!(
            details_json("rotate_secret", notes, Some("a \"quoted\" error".into())),
            r#"{"error":"a \"quoted\" error","function":"rotate_secret","stage":"PENDING"}"#
        );
    }

    /// A rotator's threads block every signal, so the server's handlers only ever run on the
    /// main thread (a reload during a rotation aborted the worker); the spawning thread's
    /// mask is left as it was.
    #[test]
    fn rotator_threads_block_every_signal() {
        fn blocked(signals: &[i32]) -> Vec<bool> {
            // SAFETY: reads this thread's mask into an initialised set.
            unsafe {
                let mut mask = std::mem::zeroed::<libc::sigset_t>();
                libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut mask);
                signals
                    .iter()
                    .map(|&signal| libc::sigismember(&mask, signal) == 1)
                    .collect()
            }
        }
        const SIGNALS: [i32; 6] = [
            libc::SIGHUP,
            libc::SIGTERM,
            libc::SIGINT,
            libc::SIGQUIT,
            libc::SIGUSR1,
            libc::SIGURG,
        ];
        let before = blocked(&SIGNALS);
        let in_thread = crate::threads::spawn(|| blocked(&SIGNALS))
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(in_thread, vec![true; SIGNALS.len()]);
        assert_eq!(blocked(&SIGNALS), before);
    }

    /// The SQLSTATE recorded for a call a PostgreSQL error ended, from its packed code.
    #[test]
    fn audit_sqlstate_text() {
        use crate::audit::sqlstate_text;
        use pgrx::PgSqlErrorCode::*;
        for (code, text) in [
            (ERRCODE_QUERY_CANCELED, "57014"),
            (ERRCODE_LOCK_NOT_AVAILABLE, "55P03"),
            (ERRCODE_INTERNAL_ERROR, "XX000"),
            (ERRCODE_SUCCESSFUL_COMPLETION, "00000"),
        ] {
            assert_eq!(sqlstate_text(code as i32), text);
        }
    }

    /// Server-log lines go to the collector as messages of whole lines that fit a protocol
    /// chunk; a longer line is one message in several chunks, only the last marked as ending
    /// it. Without the collector they are written as they are, in groups of whole lines.
    #[test]
    fn server_log_lines_are_sent_in_whole_line_chunks() {
        use crate::audit::log_pipe::{write_lines, CHUNK_BYTES, HEADER_BYTES, PAYLOAD_BYTES};
        /// Each write made, as made.
        #[derive(Default)]
        struct Writes(Vec<Vec<u8>>);
        impl std::io::Write for Writes {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.push(bytes.to_vec());
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let line = |byte: u8, length: usize| {
            let mut line = vec![byte; length - 1];
            line.push(b'\n');
            line
        };
        let long = 2 * PAYLOAD_BYTES + 826;
        let lines = [
            line(b'a', 3000),
            line(b'b', 1000),
            line(b'c', 100),
            line(b'd', long),
        ];

        let mut sent = Writes::default();
        write_lines(&mut sent, &lines, Some(4242));
        // (payload, ends its message) of each chunk, each written whole.
        let chunks: Vec<(Vec<u8>, bool)> = sent
            .0
            .iter()
            .map(|chunk| {
                assert!(chunk.len() <= CHUNK_BYTES);
                assert_eq!(chunk[..2], [0, 0]);
                let length = u16::from_ne_bytes([chunk[2], chunk[3]]) as usize;
                assert_eq!(length, chunk.len() - HEADER_BYTES);
                assert_eq!(i32::from_ne_bytes(chunk[4..8].try_into().unwrap()), 4242);
                let flags = chunk[8] as u32;
                assert_eq!(
                    flags & !pg_sys::PIPE_PROTO_IS_LAST,
                    pg_sys::PIPE_PROTO_DEST_STDERR
                );
                (
                    chunk[HEADER_BYTES..].to_vec(),
                    flags & pg_sys::PIPE_PROTO_IS_LAST != 0,
                )
            })
            .collect();
        let ends: Vec<bool> = chunks.iter().map(|(_, ends)| *ends).collect();
        assert_eq!(ends, [true, true, false, false, true]);
        assert_eq!(chunks[0].0, [lines[0].clone(), lines[1].clone()].concat());
        assert_eq!(chunks[1].0, lines[2]);
        let long_line: Vec<u8> = chunks[2..]
            .iter()
            .flat_map(|(payload, _)| payload.clone())
            .collect();
        assert_eq!(long_line, lines[3]);

        let mut written = Writes::default();
        write_lines(&mut written, &lines, None);
        let lengths: Vec<usize> = written.0.iter().map(Vec::len).collect();
        assert_eq!(lengths, [4000, 100, long]);
        assert_eq!(written.0.concat(), lines.concat());
    }

    /// Which errors' messages the audit record keeps: those that cannot quote data.
    #[test]
    fn audit_keeps_only_messages_that_quote_no_input() {
        use crate::audit::message_quotes_no_input;
        for kept in [
            "57014", "57P01", "55P03", "53200", "40001", "40P01", "23505", "23514",
        ] {
            assert!(message_quotes_no_input(kept, Some("postgres-15")), "{kept}");
            assert!(message_quotes_no_input(kept, None), "{kept}");
            assert!(!message_quotes_no_input(kept, Some("plpgsql-15")), "{kept}");
        }
        for dropped in [
            "22P02", "22021", "XX000", "55000", "42501", "42601", "P0001",
        ] {
            assert!(
                !message_quotes_no_input(dropped, Some("postgres-15")),
                "{dropped}"
            );
        }
    }

    #[pg_test]
    fn store_round_trip_in_sql() {
        let version = Spi::get_one::<pgrx::Uuid>(
            "SELECT secrets.create_secret('unit/a', secret_string => 'v1')",
        )
        .unwrap()
        .unwrap();
        let value = Spi::get_one::<String>("SELECT secrets.get_secret_value('unit/a')").unwrap();
        assert_eq!(value.as_deref(), Some("v1"));
        Spi::run("SELECT secrets.put_secret_value('unit/a', 'v2')").unwrap();
        let previous = Spi::get_one::<String>(
            "SELECT secrets.get_secret_value('unit/a', version_stage => 'PREVIOUS')",
        )
        .unwrap();
        assert_eq!(previous.as_deref(), Some("v1"));
        let by_id = Spi::get_one::<String>(&format!(
            "SELECT secrets.get_secret_value('unit/a', '{version}')"
        ))
        .unwrap();
        assert_eq!(by_id.as_deref(), Some("v1"));
    }

    /// Inside `with_catalog_search_path` a caller's operators and temporary tables are not
    /// seen, a failed subtransaction leaves that so, and afterwards the caller's path is back.
    #[pg_test]
    fn the_read_functions_search_path_shuts_out_the_callers() {
        use crate::db::{in_subtransaction, with_catalog_search_path};
        Spi::run(
            "CREATE SCHEMA unit_tricky;
             CREATE FUNCTION unit_tricky.evil_eq(text, text) RETURNS boolean
                 LANGUAGE sql AS 'SELECT 1/0 = 1';
             CREATE OPERATOR unit_tricky.= (LEFTARG = text, RIGHTARG = text,
                 FUNCTION = unit_tricky.evil_eq);
             CREATE TEMP TABLE unit_temporary (x integer);
             SET LOCAL search_path = unit_tricky, pg_temp, pg_catalog",
        )
        .unwrap();
        let text_equality =
            || in_subtransaction(|| Ok(Spi::get_one::<bool>("SELECT 'a'::text = 'a'::text")?));
        let temporary_table = || {
            in_subtransaction(|| Ok(Spi::get_one::<i64>("SELECT count(*) FROM unit_temporary")?))
        };
        let (equality, temporary) = with_catalog_search_path(|| {
            assert!(in_subtransaction(|| Ok(Spi::run("SELECT 1/0")?)).is_err());
            (text_equality(), temporary_table())
        });
        assert_eq!(equality.unwrap(), Some(true));
        assert!(temporary.is_err());
        assert!(text_equality().is_err());
        assert_eq!(temporary_table().unwrap(), Some(0));
        // An error raised inside unwinds through the guard: the subtransaction's abort drops
        // the override, the caller's path is back, and the next use pushes and pops cleanly.
        assert!(
            in_subtransaction(|| with_catalog_search_path(|| Ok(Spi::run("SELECT 1/0")?))).is_err()
        );
        assert!(text_equality().is_err());
        assert_eq!(with_catalog_search_path(text_equality).unwrap(), Some(true));
        assert!(text_equality().is_err());
    }

    /// A PostgreSQL error caught in a subtransaction keeps its own SQLSTATE, so what records it
    /// says what happened rather than "internal error"; its message only when PostgreSQL's
    /// own text for that class quotes no input.
    #[pg_test]
    fn a_caught_error_keeps_its_sqlstate_and_only_a_message_that_quotes_no_input() {
        use crate::db::in_subtransaction;
        let caught = in_subtransaction(|| Ok(Spi::run("SELECT 1/0")?)).unwrap_err();
        assert_eq!(caught.sqlstate().1, "22012");
        assert_eq!(
            caught.to_string(),
            "PostgreSQL error 22012 (division_by_zero); its message is left out, since it can \
             quote input"
        );
        // A constraint's violation is named; a PL/pgSQL RAISE in the same class is not
        // PostgreSQL's own text, and could quote anything.
        let violated = in_subtransaction(|| {
            Ok(Spi::run(
                "CREATE TEMP TABLE unit_checked (x int CONSTRAINT unit_positive CHECK (x > 0));
                 INSERT INTO unit_checked VALUES (-1)",
            )?)
        })
        .unwrap_err();
        assert_eq!(violated.sqlstate().1, "23514");
        assert!(
            violated.to_string().contains("\"unit_positive\""),
            "{violated}"
        );
        let raised = in_subtransaction(|| {
            Ok(Spi::run(
                "DO $$BEGIN RAISE EXCEPTION 'quoting %', 'unit-marker' \
                 USING ERRCODE = 'check_violation'; END$$",
            )?)
        })
        .unwrap_err();
        assert_eq!(raised.sqlstate().1, "23514");
        assert!(!raised.to_string().contains("unit-marker"), "{raised}");
    }

    #[pg_test]
    fn moving_a_secret_to_another_master_key() {
        Spi::run("SELECT secrets.create_secret('unit/b', secret_binary => '\\x00ff')").unwrap();
        Spi::run("SELECT secrets.update_secret('unit/b', key_id => 'other')").unwrap();
        let key = Spi::get_one::<String>(
            "SELECT DISTINCT v.key_id FROM secrets.secret_version v \
             JOIN secrets.secret s ON s.id = v.secret_id WHERE s.name = 'unit/b'",
        )
        .unwrap();
        assert_eq!(key.as_deref(), Some("other"));
        let value = Spi::get_one::<Vec<u8>>("SELECT secrets.get_secret_binary('unit/b')").unwrap();
        assert_eq!(value, Some(vec![0x00, 0xff]));
    }

    #[pg_test(error = "secret \"unit/c\" holds a binary value, not a string")]
    fn binary_read_as_string_is_refused() {
        Spi::run("SELECT secrets.create_secret('unit/c', secret_binary => '\\x01')").unwrap();
        Spi::run("SELECT secrets.get_secret_value('unit/c')").unwrap();
    }
}
