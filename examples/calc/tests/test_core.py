import io
import unittest
from contextlib import redirect_stdout

from calc.cli import main
from calc.core import add, div, fmt, mul, sub


class TestCore(unittest.TestCase):
    def test_arithmetic(self):
        self.assertEqual(add(2, 3), 5)
        self.assertEqual(sub(2, 3), -1)
        self.assertEqual(mul(2, 3), 6)
        self.assertEqual(div(3, 2), 1.5)
        with self.assertRaises(ZeroDivisionError):
            div(1, 0)

    def test_fmt(self):
        self.assertEqual(fmt(2.0), "2")

    def test_cli(self):
        out = io.StringIO()
        with redirect_stdout(out):
            main(["6", "*", "7"])
        self.assertEqual(out.getvalue(), "42\n")


if __name__ == "__main__":
    unittest.main()
