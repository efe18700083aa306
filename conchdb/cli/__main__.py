"""`python -m conchdb.cli`: the same as the `conchdb` command."""

from conchdb.cli import main

main()
