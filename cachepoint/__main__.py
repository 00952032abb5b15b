from cachepoint.cli import main

main()
