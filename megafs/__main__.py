from megafs.cli.main import main

main()
