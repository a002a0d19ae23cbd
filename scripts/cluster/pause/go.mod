module flotilla.invalid/pause

go 1.22
