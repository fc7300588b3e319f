from personavec.cli import main

main()
