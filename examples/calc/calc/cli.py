"""python -m calc.cli 1 + 2"""

import sys

from calc.core import add, div, fmt, mul, sub

OPS = {"+": add, "-": sub, "*": mul, "/": div}


def main(argv=None):
    a, op, b = (argv or sys.argv[1:])[:3]
    print(fmt(OPS[op](float(a), float(b))))


if __name__ == "__main__":
    main()
