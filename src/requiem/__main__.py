from requiem.cli.main import main

main()
