"""Sizes and durations as users write them (txgateway.config.units)."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from txgateway.config.units import parse_duration, parse_size


class SizeTests(SynchronousTestCase):
    def test_integers_are_bytes(self) -> None:
        self.assertEqual(parse_size(0), 0)
        self.assertEqual(parse_size(65536), 65536)

    def test_binary_units(self) -> None:
        self.assertEqual(parse_size("512B"), 512)
        self.assertEqual(parse_size("64KiB"), 64 * 1024)
        self.assertEqual(parse_size("10MiB"), 10 * 1024 * 1024)
        self.assertEqual(parse_size("1GiB"), 1024**3)
        self.assertEqual(parse_size("1TiB"), 1024**4)

    def test_decimal_units(self) -> None:
        self.assertEqual(parse_size("10KB"), 10_000)
        self.assertEqual(parse_size("3MB"), 3_000_000)
        self.assertEqual(parse_size("2GB"), 2_000_000_000)

    def test_spacing_case_and_fractions(self) -> None:
        self.assertEqual(parse_size("10 MiB"), 10 * 1024 * 1024)
        self.assertEqual(parse_size("64kib"), 64 * 1024)
        self.assertEqual(parse_size("1.5MiB"), 1536 * 1024)
        self.assertEqual(parse_size("0.1KB"), 100)
        self.assertEqual(parse_size("2048"), 2048)

    def test_invalid(self) -> None:
        for text in ("ten", "10XB", "-1", "1.1B", "MiB", "", "10 Mi B"):
            with self.assertRaises(ValueError, msg=text) as raised:
                parse_size(text)
            self.assertIn("invalid size", str(raised.exception))
        with self.assertRaises(ValueError) as raised:
            parse_size(-5)
        self.assertIn("must be >= 0", str(raised.exception))

    def test_unknown_unit_named(self) -> None:
        with self.assertRaises(ValueError) as raised:
            parse_size("10XB")
        self.assertIn("unknown unit 'XB'", str(raised.exception))


class DurationTests(SynchronousTestCase):
    def test_numbers_are_seconds(self) -> None:
        self.assertEqual(parse_duration(10), 10.0)
        self.assertEqual(parse_duration(0.025), 0.025)
        self.assertEqual(parse_duration(0), 0.0)
        self.assertIsInstance(parse_duration(10), float)

    def test_units(self) -> None:
        self.assertEqual(parse_duration("250ms"), 0.25)
        self.assertEqual(parse_duration("30s"), 30.0)
        self.assertEqual(parse_duration("5m"), 300.0)
        self.assertEqual(parse_duration("1h"), 3600.0)
        self.assertEqual(parse_duration("1.5"), 1.5)

    def test_invalid(self) -> None:
        for value in ("soon", "5d", -1, -0.5, float("inf"), float("nan")):
            with self.assertRaises(ValueError, msg=repr(value)):
                parse_duration(value)
